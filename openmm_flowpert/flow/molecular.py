"""Normalized internal coordinates: the fixed transform of molecular flows (CNF space -> Cartesians).

y (length 3N - 6, unit scale) -> internal coordinates -> mean-free Cartesians x (3N, nm) in the
*canonical frame* of the Z-matrix (first atom pair along +x, first three atoms in the xy plane).

- Bonds (nm) and angles (rad): ``ic = mean + std * y``.
- Torsions (rad): each circle is cut at its least-populated angle ``cut`` (from the training data)
  and the open interval (cut, cut + 2 pi) is mapped onto the real line by the exact bijection
  ``t = cut + pi (1 + tanh(v))``, ``v = mean + std * y`` (near-linear where the data are, and
  never outside the circle).

Orientation. The target is rotation invariant, so the global orientation is not learned: a
proposal is the canonical-frame structure rotated by a rotation R drawn from the uniform (Haar)
measure on SO(3), or by any R that does not depend on the proposal (e.g. the current state's, which
keeps the Metropolis kernel exact because the target factorizes into internal coordinates times
orientation). The log-determinant returned here is that of the full Haar-rotated proposal density,

    log |det| = sum log std + sum_torsions log(pi (1 - tanh^2 v))
              + [2 sum log b + sum log sin a - 1.5 log N] + log(8 pi^2),

so log q(x) = log p_Z(z) - log|det J_CNF| - log|det| is the proposal density of x on the mean-free
subspace (orthonormal-basis measure), whatever the orientation: the Haar density of omega,
2 (1 - cos|omega|) / |omega|^2 / (8 pi^2), cancels the orientation factor of
:class:`~openmm_flowpert.flow.internal.InternalCoordinates` and leaves 1 / (8 pi^2).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch

from .internal import InternalCoordinates, build_zmatrix
from .transforms import FixedTransform, register_transform

__all__ = ["NormalizedInternal", "least_populated_angle", "frame_rotation", "haar_rotations"]

_LOG_8PI2 = math.log(8.0 * math.pi ** 2)


def least_populated_angle(t: torch.Tensor, n_bins: int = 72) -> torch.Tensor:
    """Per column of angles t (n, m) in rad: the centre of the emptiest of ``n_bins`` bins on the
    circle after smoothing the histogram over 3 neighbouring bins."""
    edges = 2.0 * math.pi / n_bins
    idx = torch.floor(torch.remainder(t + math.pi, 2.0 * math.pi) / edges).long().clamp_(0, n_bins - 1)
    counts = torch.zeros(t.shape[1], n_bins, dtype=torch.float64)
    counts.scatter_add_(1, idx.t(), torch.ones_like(idx.t(), dtype=torch.float64))
    smooth = counts + counts.roll(1, 1) + counts.roll(-1, 1)
    best = smooth.argmin(1).double()
    return -math.pi + (best + 0.5) * edges


def frame_rotation(x: torch.Tensor, frame: Tuple[int, int, int, bool]) -> torch.Tensor:
    """Rotation matrices R (B, 3, 3) with x = R x_canonical (+ a translation) for Cartesians
    x (B, N, 3): the orientation (columns e1, e2, e3) of the Z-matrix frame of each configuration.

    ``frame`` = (a0, a1, a2, a2_on_a0): the first three atoms of the Z-matrix and whether a2 is
    bonded to a0 (see :class:`~openmm_flowpert.flow.internal.InternalCoordinates`).
    """
    a0, a1, a2, on_a0 = frame
    x0, x1, x2 = x[:, a0], x[:, a1], x[:, a2]
    e1 = x1 - x0
    e1 = e1 / torch.linalg.vector_norm(e1, dim=-1, keepdim=True)
    v = x2 - (x0 if on_a0 else x1)
    e2 = v - (v * e1).sum(-1, keepdim=True) * e1
    e2 = e2 / torch.linalg.vector_norm(e2, dim=-1, keepdim=True)
    return torch.stack([e1, e2, torch.linalg.cross(e1, e2, dim=-1)], -1)


def haar_rotations(g: torch.Tensor) -> torch.Tensor:
    """Uniform (Haar) rotations (B, 3, 3) from standard-normal 4-vectors g (B, 4): the normalized
    4-vector is a uniform unit quaternion."""
    q = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


@register_transform
class NormalizedInternal(FixedTransform):
    """Fixed bijection y (B, 3N - 6) -> canonical-frame mean-free Cartesians x (B, 3N) in nm.

    ``forward(y) -> (x, logdet)`` and ``inverse(x) -> (y, logdet)`` as every transform of
    :mod:`openmm_flowpert.flow.transforms` (registered as ``"internal"``); see the module
    docstring for the map and logdet. Build one from data with :meth:`fit` (or
    :meth:`from_samples`, from a topology). TorchScript-compatible; float64.

    Parameters
    ----------
    ic : InternalCoordinates
        The Z-matrix (atom ordering included; saved inside the flow file).
    mean, std : Tensor (3N - 6,)
        Normalization of bonds, angles and (cut, tanh-mapped) torsions.
    cut : Tensor (N - 3,)
        Cut angle of each torsion circle (rad).
    """

    name = "internal"
    molecular = True

    def __init__(self, ic: InternalCoordinates, mean: torch.Tensor, std: torch.Tensor, cut: torch.Tensor):
        super().__init__()
        n = ic.n_atoms
        self.ic = ic
        self.n_atoms = n
        self.dim = 3 * n - 6
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std = torch.as_tensor(std, dtype=torch.float64).flatten()
        cut = torch.as_tensor(cut, dtype=torch.float64).flatten()
        if mean.numel() != self.dim or std.numel() != self.dim or cut.numel() != n - 3:
            raise ValueError(f"normalization of {mean.numel()}/{std.numel()} values and {cut.numel()} cuts "
                             f"do not fit {n} atoms ({self.dim} coordinates, {n - 3} torsions)")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive")
        is_t = torch.zeros(self.dim, dtype=torch.bool)
        is_t[5::3] = True
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("cut", cut)
        self.register_buffer("is_torsion", is_t)
        self.register_buffer("log_std_sum", torch.log(std).sum().reshape(1))
        self.log_8pi2 = _LOG_8PI2

    # -- construction from data --------------------------------------------------------------------
    @classmethod
    def fit(cls, ic: InternalCoordinates, x: torch.Tensor) -> "NormalizedInternal":
        """Normalization from training Cartesians x (n, 3N) in nm (float64)."""
        y, _ = ic.inverse(torch.as_tensor(x, dtype=torch.float64))
        raw = torch.cat([y[:, :3], y[:, 6:]], 1)
        cut = least_populated_angle(raw[:, 5::3])
        tors = torch.remainder(raw[:, 5::3] - cut, 2.0 * math.pi) / math.pi - 1.0
        lim = 1.0 - 1e-12
        v = torch.atanh(tors.clamp(-lim, lim))
        mapped = raw.clone()
        mapped[:, 5::3] = v
        return cls(ic, mapped.mean(0), mapped.std(0).clamp_min(1e-6), cut)

    # -- the transform interface (Python only) -----------------------------------------------------
    @classmethod
    def from_samples(cls, x: torch.Tensor, n_atoms: int, mean_free: bool, topology=None) -> "NormalizedInternal":
        """Z-matrix from the bonds of ``topology`` (openmm.app or mdtraj), normalization from x (n, 3N)."""
        if topology is None:
            raise ValueError("coordinates='internal' needs the topology (openmm.app.Topology or mdtraj.Topology)")
        if hasattr(topology, "to_openmm"):  # mdtraj
            topology = topology.to_openmm()
        if topology.getNumAtoms() != n_atoms:
            raise ValueError(f"the topology has {topology.getNumAtoms()} atoms but the samples have {n_atoms}")
        return cls.fit(InternalCoordinates(build_zmatrix(topology), n_atoms), x)

    def config(self) -> Dict[str, Any]:
        return {"n_atoms": int(self.n_atoms)}

    @classmethod
    def from_state(cls, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> "NormalizedInternal":
        ic = InternalCoordinates(state["ic.zmatrix"], int(config["n_atoms"]))
        t = cls(ic, state["mean"], state["std"], state["cut"])
        t.load_state_dict(state)
        return t

    def flow_layout(self, cnf_dim: int, n_particles: int) -> Dict[str, Any]:
        if n_particles:
            raise ValueError("an internal-coordinate flow has a plain (not mean-free) CNF: use n_particles=0")
        if self.dim != cnf_dim:
            raise ValueError(f"the velocity field has {cnf_dim} coordinates; the internal-coordinate "
                             f"transform needs {self.dim} (3N - 6)")
        ic = self.ic
        return {"coordinates": "internal", "x_dim": 3 * self.n_atoms, "n_atoms": self.n_atoms, "mean_free": True,
                "orientation": "haar", "frame": [ic.a0, ic.a1, ic.a2, bool(ic.a2_on_a0)],
                "zmatrix": ic.zmatrix.tolist()}

    def cnf_particles(self) -> int:
        return 0

    # -- the map -----------------------------------------------------------------------------------
    def _torsion_logdet(self, v: torch.Tensor) -> torch.Tensor:
        # log(pi (1 - tanh^2 v)) = log pi + 2 log 2 - 2 |v| - 2 log1p(exp(-2 |v|)), summed
        a = v.abs()
        per = math.log(math.pi) + 2.0 * math.log(2.0) - 2.0 * a - 2.0 * torch.log1p(torch.exp(-2.0 * a))
        return per.sum(-1)

    def _logdet(self, ic_y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.log_std_sum + self._torsion_logdet(v) + self.ic.log_det(ic_y) + self.log_8pi2

    def forward(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalized y (B, 3N - 6) -> canonical-frame mean-free x (B, 3N) nm and log |det|."""
        raw = self.mean + self.std * y
        v = raw[:, 5::3]
        t = self.cut + math.pi * (1.0 + torch.tanh(v))
        rest = raw[:, 3:].reshape(y.shape[0], -1, 3)
        rest = torch.cat([rest[:, :, :2], t.unsqueeze(-1)], -1).reshape(y.shape[0], -1)
        zero = torch.zeros(y.shape[0], 3, dtype=y.dtype, device=y.device)
        ic_y = torch.cat([raw[:, :3], zero, rest], 1)
        x, _ = self.ic(ic_y)
        return x, self._logdet(ic_y, v)

    @torch.jit.export
    def inverse(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cartesians x (B, 3N) nm, any position and orientation -> normalized y and log |det|."""
        ic_y, _ = self.ic.inverse(x)
        B = x.shape[0]
        raw = torch.cat([ic_y[:, :3], ic_y[:, 6:]], 1)
        s = torch.remainder(raw[:, 5::3] - self.cut, 2.0 * math.pi) / math.pi - 1.0
        v = torch.atanh(s)
        rest = raw[:, 3:].reshape(B, -1, 3)
        mapped = torch.cat([raw[:, :3], torch.cat([rest[:, :, :2], v.unsqueeze(-1)], -1).reshape(B, -1)], 1)
        y = (mapped - self.mean) / self.std
        ic_y0 = torch.cat([ic_y[:, :3], torch.zeros_like(ic_y[:, 3:6]), ic_y[:, 6:]], 1)
        return y, self._logdet(ic_y0, v)
