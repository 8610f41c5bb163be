"""A small molecule with exactly known torsion populations: the test system of molecular flows.

A chain of N united atoms (a longer butane) with harmonic bonds and angles and a three-well torsion
potential (reduced units, kT)::

    u(x) = sum_bonds (b - b0)^2 / (2 sb^2) + sum_angles (a - a0)^2 / (2 sa^2) + sum_torsions V(t),
    V(t) = depth * cos(3 t) + bias * cos(t)

(trans well at t = pi, gauche wells at +-pi/3; ``bias`` > 0 favours trans). The Boltzmann density
in Z-matrix coordinates of the chain factorizes, and the Jacobian b^2 sin(a) does not involve the
torsions, so each torsion's marginal is exactly exp(-V(t)) / Z_t: the trans fraction
P(|t| > 2 pi / 3) follows from a 1-D quadrature. Energies are rotation and translation invariant.
Pure torch.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..flow.internal import InternalCoordinates, build_zmatrix

__all__ = ["TorsionChain"]


class TorsionChain:
    """Chain molecule target (see the module docstring).

    Parameters
    ----------
    n_atoms : int
        At least 4 (n_atoms - 3 torsions).
    b0, sb : float
        Bond length and its thermal spread (nm).
    a0, sa : float
        Angle and spread (rad).
    depth, bias : float
        Torsion potential parameters (kT).
    """

    def __init__(self, n_atoms: int = 5, b0: float = 0.153, sb: float = 0.004, a0: float = 1.95,
                 sa: float = 0.08, depth: float = 2.0, bias: float = 0.5):
        if n_atoms < 4:
            raise ValueError("a torsion chain needs at least 4 atoms")
        self.n_atoms, self.b0, self.sb, self.a0, self.sa = n_atoms, b0, sb, a0, sa
        self.depth, self.bias = depth, bias
        self.topology = self._topology()
        self.ic = InternalCoordinates(build_zmatrix(self.topology), n_atoms)

    def _topology(self):
        from openmm import app

        top = app.Topology()
        res = top.addResidue("CHN", top.addChain())
        atoms = [top.addAtom(f"C{i}", app.element.carbon, res) for i in range(self.n_atoms)]
        for a, b in zip(atoms[:-1], atoms[1:]):
            top.addBond(a, b)
        return top

    def torsion_energy(self, t: torch.Tensor) -> torch.Tensor:
        """V(t) in kT."""
        return self.depth * torch.cos(3.0 * t) + self.bias * torch.cos(t)

    def internal(self, x) -> torch.Tensor:
        """Z-matrix coordinates (B, 3N - 3) of positions (B, N, 3) nm (see InternalCoordinates)."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(-1, 3 * self.n_atoms)
        return self.ic.inverse(x)[0]

    def torsions(self, x) -> torch.Tensor:
        """Torsions (B, N - 3) in rad."""
        return self.internal(x)[:, 8::3]

    def energy(self, x) -> torch.Tensor:
        """Reduced potential u(x) (kT) of positions (B, N, 3) in nm."""
        y = self.internal(x)
        b = torch.cat([y[:, 0:2], y[:, 6::3]], 1)
        a = torch.cat([y[:, 2:3], y[:, 7::3]], 1)
        t = y[:, 8::3]
        return (((b - self.b0) / self.sb) ** 2 / 2).sum(1) + (((a - self.a0) / self.sa) ** 2 / 2).sum(1) \
            + self.torsion_energy(t).sum(1)

    @staticmethod
    def is_trans(t: torch.Tensor) -> torch.Tensor:
        """1.0 where a torsion (rad) is in the trans well, |t| > 2 pi / 3, else 0.0."""
        return (t.abs() > 2.0 * math.pi / 3.0).double()

    @property
    def exact_trans_fraction(self) -> float:
        """P(|t| > 2 pi / 3) of each torsion under the Boltzmann distribution (quadrature, ~1e-10)."""
        t = torch.linspace(-math.pi, math.pi, 600001, dtype=torch.float64)
        p = torch.exp(-self.torsion_energy(t))
        return float(torch.trapezoid(p * self.is_trans(t), t) / torch.trapezoid(p, t))

    def trans_fraction(self, x) -> torch.Tensor:
        """Fraction of trans torsions of each configuration (B,) of positions (B, N, 3) nm."""
        return self.is_trans(self.torsions(x)).mean(1)

    def sample_training(self, n: int, seed: int = 0) -> torch.Tensor:
        """Approximate training configurations (n, N, 3) nm: Gaussian bonds and angles, torsions
        from Gaussians at the three wells with equal weights, random orientation. Not Boltzmann
        (the trans fraction is 1/3): samplers must reweight them."""
        g = torch.Generator().manual_seed(int(seed))
        N = self.n_atoms
        y = torch.zeros(n, 3 * N - 3, dtype=torch.float64)
        y[:, 0:2] = self.b0 + self.sb * torch.randn(n, 2, generator=g, dtype=torch.float64)
        y[:, 2] = self.a0 + self.sa * torch.randn(n, generator=g, dtype=torch.float64)
        q = torch.randn(n, 4, generator=g, dtype=torch.float64)
        q = q / q.norm(dim=1, keepdim=True)
        q = q * torch.sign(q[:, :1])
        half = torch.acos(q[:, 0].clamp(-1, 1))
        axis = q[:, 1:] / torch.sin(half).clamp_min(1e-12).unsqueeze(1)
        y[:, 3:6] = 2 * half.unsqueeze(1) * axis
        m = N - 3
        y[:, 6::3] = self.b0 + self.sb * torch.randn(n, m, generator=g, dtype=torch.float64)
        y[:, 7::3] = self.a0 + self.sa * torch.randn(n, m, generator=g, dtype=torch.float64)
        well = torch.randint(-1, 2, (n, m), generator=g).double()  # -1, 0, 1: gauche-, trans, gauche+
        centre = torch.where(well == 0, torch.full_like(well, math.pi), well * math.pi / 3)
        y[:, 8::3] = centre + 0.3 * torch.randn(n, m, generator=g, dtype=torch.float64)
        x, _ = self.ic(y)
        return x.reshape(n, N, 3)
