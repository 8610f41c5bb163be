"""The two-well Gaussian mixture as an OpenMM System (openmm-torch ``TorchForce``).

The energy in kJ/mol is ``kT * u(x / length_scale)`` where ``x`` are the flattened positions in nm
(d = 3 * n_particles, particle-major: x[3*i + k] is coordinate k of particle i) and ``u`` is the
normalized reduced energy of :class:`GaussianMixtureTarget`. The potential is NOT translation
invariant: use flows that are not mean-free.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
import openmm
import openmm.app
from openmm import unit

from ..energies.reduced_potential import kT_kJ_per_mol
from .gmm import GaussianMixtureTarget

__all__ = ["GaussianMixture", "GaussianMixtureEnergy"]



class GaussianMixtureEnergy(torch.nn.Module):
    """TorchScript-able energy: positions (n, 3) in nm -> kT * u(x / scale) in kJ/mol (float64 scalar).

    Computed in float64 whatever the input dtype; forces come from autograd in openmm-torch.
    """

    def __init__(self, target: GaussianMixtureTarget, kT: float, length_scale: float):
        super().__init__()
        self.register_buffer("means", target.means.clone().unsqueeze(1))    # (2, 1, d)
        # whitening matrices W_j = R_j diag(eig_j)^(-1/2): (x - mu_j) W_j ~ N(0, I) in well j
        self.register_buffer("whiten", target.rotations * target.eigenvalues.rsqrt().unsqueeze(1))
        log_norm = (target.weights.log() - 0.5 * (target.eigenvalues.log().sum(-1)
                                                  + target.dim * math.log(2.0 * math.pi)))
        self.register_buffer("log_norm", log_norm)                          # (2,)
        self.kT = float(kT)
        self.inv_scale = 1.0 / float(length_scale)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # one batched matmul for both wells (openmm-torch runs forward + backward on every call)
        x = positions.to(torch.float64).reshape(1, 1, -1) * self.inv_scale   # GMM units
        z = torch.bmm(x - self.means, self.whiten).squeeze(1)                 # (2, d) whitened
        log_p = self.log_norm - 0.5 * (z * z).sum(-1)
        return -self.kT * torch.logsumexp(log_p, 0)


class GaussianMixture:
    """Two-well Gaussian mixture target as an OpenMM System with exact reference observables.

    Parameters
    ----------
    n_particles : int
        Number of particles; the target dimension is d = 3 * n_particles.
    temperature : openmm Quantity or float
        Temperature (float: K); energies are kT * u in kJ/mol.
    weights, separation, seed
        As in :class:`GaussianMixtureTarget` (GMM units).
    length_scale : float
        nm per GMM unit: positions x (nm) map to GMM coordinates x / length_scale.
    mass : float
        Particle mass in amu. With the default 12 amu and length_scale 1, the stiffest well direction
        (std >= 0.1 nm) has a period of about 1.4 ps at 300 K, so 1-2 fs MD steps are safe.

    Attributes
    ----------
    system : openmm.System
        Non-periodic, unconstrained; its only force is a ``TorchForce`` holding the scripted module.
    topology : openmm.app.Topology
        One chain, one residue "GMM", n_particles carbon atoms named C0, C1, ...
    positions : openmm Quantity (n_particles, 3) in nm
        An exact sample (seed ``seed``), a typical equilibrium configuration.
    target : GaussianMixtureTarget
    temperature : openmm Quantity
    kT : float
        kJ/mol.
    """

    def __init__(self, n_particles: int = 4, temperature=300.0 * unit.kelvin,
                 weights: Sequence[float] = (0.25, 0.75), separation: float = 2.0,
                 length_scale: float = 1.0, seed: int = 0, mass: float = 12.0):
        if n_particles < 1:
            raise ValueError(f"n_particles must be >= 1, got {n_particles}")
        if length_scale <= 0:
            raise ValueError(f"length_scale must be > 0 nm, got {length_scale}")
        temperature_K = (temperature.value_in_unit(unit.kelvin) if unit.is_quantity(temperature)
                         else float(temperature))
        self.n_particles = int(n_particles)
        self.temperature = temperature_K * unit.kelvin
        self.kT = kT_kJ_per_mol(temperature_K)
        self.length_scale = float(length_scale)
        self.target = GaussianMixtureTarget(dim=3 * self.n_particles, weights=weights,
                                            separation=separation, seed=seed)
        self.module = torch.jit.script(GaussianMixtureEnergy(self.target, self.kT, self.length_scale))

        self.system = openmm.System()
        for _ in range(self.n_particles):
            self.system.addParticle(float(mass) * unit.amu)
        import openmmtorch  # imported here: it prints a deprecation warning at import

        force = openmmtorch.TorchForce(self.module)   # the module bytes are embedded, XML-serializable
        force.setUsesPeriodicBoundaryConditions(False)
        self.system.addForce(force)

        self.topology = openmm.app.Topology()
        chain = self.topology.addChain()
        residue = self.topology.addResidue("GMM", chain)
        carbon = openmm.app.Element.getBySymbol("C")
        for i in range(self.n_particles):
            self.topology.addAtom(f"C{i}", carbon, residue)
        self.positions = unit.Quantity(self.sample(1, seed=seed)[0], unit.nanometer)

    @property
    def exact_fraction_left(self) -> float:
        """Exact probability that particle 0's x coordinate (GMM coordinate x_0) is negative."""
        return self.target.exact_fraction_left

    def exact_mean_reduced_energy(self, n: int = 400_000, seed: int = 12345) -> Tuple[float, float]:
        """Mean reduced energy <u> in kT under the target by exact sampling: (mean, standard error)."""
        return self.target.exact_mean_energy(n=n, seed=seed)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """Exact iid samples as positions in nm, float64 array (n, n_particles, 3)."""
        x = self.target.sample(int(n), seed=seed).numpy()
        return x.reshape(int(n), self.n_particles, 3) * self.length_scale

    def reduced_energy(self, positions) -> np.ndarray:
        """Reduced energy u (kT) from the pure-torch target, positions (B, n_particles, 3) in nm."""
        x = torch.as_tensor(np.asarray(positions, dtype=np.float64)).reshape(-1, 3 * self.n_particles)
        return self.target.energy(x / self.length_scale).numpy()

    @staticmethod
    def left(positions) -> np.ndarray:
        """Indicator of the left well (particle 0's x < 0), positions (B, n_particles, 3); (B,) bool."""
        return np.asarray(positions)[..., 0, 0] < 0.0
