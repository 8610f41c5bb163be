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
from typing import Any, Dict, List, Optional, Tuple

import torch

from .internal import InternalCoordinates, build_zmatrix
from .transforms import FixedTransform, register_transform

__all__ = ["NormalizedInternal", "MarginalInternal", "CircularInternal", "TorusInternal", "least_populated_angle",
           "torsion_marginals", "emptiest_bin_density", "frame_rotation", "haar_rotations"]

_LOG_8PI2 = math.log(8.0 * math.pi ** 2)


def least_populated_angle(t: torch.Tensor, n_bins: int = 72) -> torch.Tensor:
    """Per column of angles t (n, m) in rad: the centre of the emptiest of ``n_bins`` bins on the
    circle after smoothing the histogram over 3 neighbouring bins."""
    best = _smoothed_counts(t, n_bins).argmin(1).double()
    return -math.pi + (best + 0.5) * (2.0 * math.pi / n_bins)


def _smoothed_counts(t: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Counts (m, n_bins) of each column of angles t (n, m) in bins from -pi, each summed with its
    two neighbours on the circle."""
    idx = torch.floor(torch.remainder(t + math.pi, 2.0 * math.pi) / (2.0 * math.pi / n_bins)).long()
    idx = idx.clamp_(0, n_bins - 1)
    counts = torch.zeros(t.shape[1], n_bins, dtype=torch.float64)
    counts.scatter_add_(1, idx.t(), torch.ones_like(idx.t(), dtype=torch.float64))
    return counts + counts.roll(1, 1) + counts.roll(-1, 1)


def emptiest_bin_density(t: torch.Tensor, n_bins: int = 72) -> torch.Tensor:
    """Per column of angles t (n, m) rad: the density of the emptiest of ``n_bins`` bins on the
    circle (counts smoothed over 3 neighbouring bins, as :func:`least_populated_angle`) relative to
    the uniform density, shape (m,): about 1 for a freely rotating torsion, 0 for one confined to
    an arc."""
    return _smoothed_counts(t, n_bins).min(1).values / 3.0 / (t.shape[0] / n_bins)


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

    def torsions(self) -> List[int]:
        return torch.nonzero(self.is_torsion).flatten().tolist()

    # -- the map -----------------------------------------------------------------------------------
    def _torsion_logdet(self, v: torch.Tensor) -> torch.Tensor:
        # log(pi (1 - tanh^2 v)) = log pi + 2 log 2 - 2 |v| - 2 log1p(exp(-2 |v|)), summed
        a = v.abs()
        per = math.log(math.pi) + 2.0 * math.log(2.0) - 2.0 * a - 2.0 * torch.log1p(torch.exp(-2.0 * a))
        return per.sum(-1)

    def _to_angle(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Torsions on the line v (B, N - 3) -> angles t (rad) and sum log |dt/dv| (B,)."""
        return self.cut + math.pi * (1.0 + torch.tanh(v)), self._torsion_logdet(v)

    def _to_line(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Angles t (B, N - 3) rad, any branch -> v on the line and sum log |dt/dv| (B,)."""
        v = torch.atanh(torch.remainder(t - self.cut, 2.0 * math.pi) / math.pi - 1.0)
        return v, self._torsion_logdet(v)

    def _logdet(self, ic_y: torch.Tensor, logdet_t: torch.Tensor) -> torch.Tensor:
        return self.log_std_sum + logdet_t + self.ic.log_det(ic_y) + self.log_8pi2

    def forward(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalized y (B, 3N - 6) -> canonical-frame mean-free x (B, 3N) nm and log |det|."""
        raw = self.mean + self.std * y
        t, logdet_t = self._to_angle(raw[:, 5::3])
        rest = raw[:, 3:].reshape(y.shape[0], -1, 3)
        rest = torch.cat([rest[:, :, :2], t.unsqueeze(-1)], -1).reshape(y.shape[0], -1)
        zero = torch.zeros(y.shape[0], 3, dtype=y.dtype, device=y.device)
        ic_y = torch.cat([raw[:, :3], zero, rest], 1)
        x, _ = self.ic(ic_y)
        return x, self._logdet(ic_y, logdet_t)

    @torch.jit.export
    def inverse(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cartesians x (B, 3N) nm, any position and orientation -> normalized y and log |det|."""
        ic_y, _ = self.ic.inverse(x)
        B = x.shape[0]
        raw = torch.cat([ic_y[:, :3], ic_y[:, 6:]], 1)
        v, logdet_t = self._to_line(raw[:, 5::3])
        rest = raw[:, 3:].reshape(B, -1, 3)
        mapped = torch.cat([raw[:, :3], torch.cat([rest[:, :, :2], v.unsqueeze(-1)], -1).reshape(B, -1)], 1)
        y = (mapped - self.mean) / self.std
        ic_y0 = torch.cat([ic_y[:, :3], torch.zeros_like(ic_y[:, 3:6]), ic_y[:, 6:]], 1)
        return y, self._logdet(ic_y0, logdet_t)


def torsion_marginals(t: torch.Tensor, cut: torch.Tensor, n_bins: int = 180, smooth_bins: float = 1.0,
                      floor: float = 1e-3) -> torch.Tensor:
    """Bin masses (m, n_bins) of the marginal of each torsion column of t (n, m) rad on its circle,
    starting at its ``cut`` (m,): a histogram smoothed by a periodic Gaussian kernel of
    ``smooth_bins`` bins, mixed with the uniform density at weight ``floor`` (so that every angle
    keeps a positive density), each row summing to 1."""
    width = 2.0 * math.pi / n_bins
    s = torch.remainder(t.double() - cut, 2.0 * math.pi)
    idx = torch.floor(s / width).long().clamp_(0, n_bins - 1)
    counts = torch.zeros(t.shape[1], n_bins, dtype=torch.float64)
    counts.scatter_add_(1, idx.t(), torch.ones_like(idx.t(), dtype=torch.float64))
    if smooth_bins > 0:
        k = torch.arange(-4 * int(math.ceil(smooth_bins)), 4 * int(math.ceil(smooth_bins)) + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (k / smooth_bins) ** 2)
        kernel = kernel / kernel.sum()
        counts = sum(kernel[i] * counts.roll(int(k[i]), 1) for i in range(k.numel()))
    mass = counts / counts.sum(1, keepdim=True)
    return (1.0 - floor) * mass + floor / n_bins


@register_transform
class MarginalInternal(NormalizedInternal):
    """Normalized internal coordinates whose torsions are mapped to the line by their own marginals.

    As :class:`NormalizedInternal` (bonds, angles, Haar orientation, cut at the least-populated
    angle), but each torsion t goes to the line through the fitted marginal distribution of the
    training data instead of a tanh: with F the cumulative distribution of a piecewise-constant
    density on (cut, cut + 2 pi) (a smoothed histogram of ``n_bins`` bins with a uniform floor, see
    :func:`torsion_marginals`), ``v = Phi^-1(F(t))`` and ``t = F^-1(Phi(v))``, Phi the standard
    normal distribution function, so that

        log |dt/dv| = log phi(v) - log f(t)      (phi the standard normal density, f = F').

    Every torsion of the data is then standard normal on the line: a three-fold methyl rotor, whose
    narrow peaks a tanh map leaves for the velocity field to resolve (and the bundled flow of the
    tanh map spread almost uniformly over the circle), costs the flow nothing. Both directions are
    exact to round-off; the lower half (v <= 0) is computed from F and the upper half from 1 - F,
    so that round trips hold in both tails. Registered as ``"internal-cdf"``.

    Parameters
    ----------
    ic, mean, std, cut
        As :class:`NormalizedInternal` (mean and std of the mapped torsions are close to 0 and 1).
    mass : Tensor (N - 3, n_bins)
        Bin masses of each torsion's density on (cut, cut + 2 pi), positive, rows summing to 1.
    """

    name = "internal-cdf"

    def __init__(self, ic: InternalCoordinates, mean: torch.Tensor, std: torch.Tensor, cut: torch.Tensor,
                 mass: torch.Tensor):
        super().__init__(ic, mean, std, cut)
        mass = torch.as_tensor(mass, dtype=torch.float64)
        if mass.dim() != 2 or mass.shape[0] != self.n_atoms - 3 or not bool((mass > 0).all()):
            raise ValueError(f"mass must be positive with shape ({self.n_atoms - 3}, n_bins), got {tuple(mass.shape)}")
        mass = mass / mass.sum(1, keepdim=True)
        n_bins = mass.shape[1]
        zero = torch.zeros(mass.shape[0], 1, dtype=torch.float64)
        cdf = torch.cat([zero, mass.cumsum(1)], 1)
        sf = torch.cat([mass.flip(1).cumsum(1).flip(1), zero], 1)  # 1 - cdf, summed from the top
        cdf[:, -1] = 1.0
        sf[:, 0] = 1.0
        self.n_bins = int(n_bins)
        self.width = 2.0 * math.pi / n_bins
        self.register_buffer("mass", mass)
        self.register_buffer("cdf", cdf)
        self.register_buffer("neg_sf", -sf)  # increasing, for searchsorted
        self.register_buffer("sf", sf)
        self.register_buffer("log_density", torch.log(mass / self.width))

    @classmethod
    def fit(cls, ic: InternalCoordinates, x: torch.Tensor, n_bins: int = 180) -> "MarginalInternal":
        """Normalization and torsion marginals from training Cartesians x (n, 3N) in nm (float64)."""
        y, _ = ic.inverse(torch.as_tensor(x, dtype=torch.float64))
        raw = torch.cat([y[:, :3], y[:, 6:]], 1)
        cut = least_populated_angle(raw[:, 5::3])
        mass = torsion_marginals(raw[:, 5::3], cut, n_bins)
        n = raw.shape[1]
        unit = cls(ic, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), cut, mass)
        v, _ = unit._to_line(raw[:, 5::3])
        mapped = raw.clone()
        mapped[:, 5::3] = v
        return cls(ic, mapped.mean(0), mapped.std(0).clamp_min(1e-6), cut, mass)

    @classmethod
    def from_state(cls, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> "MarginalInternal":
        ic = InternalCoordinates(state["ic.zmatrix"], int(config["n_atoms"]))
        t = cls(ic, state["mean"], state["std"], state["cut"], state["mass"])
        t.load_state_dict(state)
        return t

    def flow_layout(self, cnf_dim: int, n_particles: int) -> Dict[str, Any]:
        layout = super().flow_layout(cnf_dim, n_particles)
        layout["coordinates"] = self.name
        return layout

    def _gather(self, table: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """table (m, K) at bin indices j (B, m) -> (B, m)."""
        return torch.gather(table, 1, j.t().contiguous()).t()

    def _to_angle(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        t, logdet = self._line_to_angle(v)
        return t, logdet.sum(-1)

    def _to_line(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        v, logdet = self._angle_to_line(t)
        return v, logdet.sum(-1)

    def _line_to_angle(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """v (B, N - 3) on the line -> torsions t (rad) and log |dt/dv| per torsion (B, N - 3)."""
        lower = v <= 0.0
        u_lo = torch.special.ndtr(v)        # F(t) where v <= 0
        u_hi = torch.special.ndtr(-v)       # 1 - F(t) where v > 0
        last = self.n_bins - 1
        j_lo = (torch.searchsorted(self.cdf, u_lo.t().contiguous(), right=True).t() - 1).clamp(0, last)
        j_hi = (torch.searchsorted(self.neg_sf, (-u_hi).t().contiguous(), right=False).t() - 1).clamp(0, last)
        j = torch.where(lower, j_lo, j_hi)
        dens = self._gather(self.mass, j) / self.width
        # within a bin F is linear: s = (left edge) + (u - F(left edge)) / mass * width, and from the top
        s_lo = (j_lo.to(v.dtype) + (u_lo - self._gather(self.cdf, j_lo)) / self._gather(self.mass, j_lo)) * self.width
        s_hi = ((j_hi + 1).to(v.dtype) - (u_hi - self._gather(self.sf, j_hi + 1)) / self._gather(self.mass, j_hi)) \
            * self.width
        s = torch.where(lower, s_lo, s_hi)
        logdet = -0.5 * v * v - 0.5 * math.log(2.0 * math.pi) - torch.log(dens)
        return self.cut + s, logdet

    def _angle_to_line(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Torsions t (B, N - 3) rad, any branch -> v on the line and log |dt/dv| per torsion."""
        s = torch.remainder(t - self.cut, 2.0 * math.pi)
        j = torch.floor(s / self.width).long().clamp(0, self.n_bins - 1)
        frac = s - j.to(s.dtype) * self.width
        m = self._gather(self.mass, j)
        u_lo = self._gather(self.cdf, j) + m * (frac / self.width)
        u_hi = self._gather(self.sf, j + 1) + m * ((self.width - frac) / self.width)
        v = torch.where(u_lo <= 0.5, torch.special.ndtri(u_lo.clamp_min(1e-300)),
                        -torch.special.ndtri(u_hi.clamp_min(1e-300)))
        logdet = -0.5 * v * v - 0.5 * math.log(2.0 * math.pi) - torch.log(m / self.width)
        return v, logdet


@register_transform
class CircularInternal(MarginalInternal):
    """Normalized internal coordinates whose rotating torsions stay on the circle.

    Bonds, angles, the Haar orientation and the torsions' fitted marginals are those of
    :class:`MarginalInternal`, but a torsion on the circle (``on_circle``) is not cut open: the
    CNF coordinate is the angle s = 2 pi F(t) - pi (F the fitted marginal distribution from
    ``cut``), so

        t = cut + F^-1((s + pi) / (2 pi)),     log |dt/ds| = -log(2 pi) - log f(t),

    a diffeomorphism of the circle (s = -pi and s = pi are the same point, t = cut). The CNF in
    front of it treats these coordinates as periodic (:meth:`periodic`): its velocity field sees
    them through cos and sin, its prior on them is uniform on the circle, and its flow map
    commutes with 2 pi translations, so the proposal density has no seam anywhere on the circle
    and fp / fp++ stay exact through it (docs/algorithm.md section 14). The uniform prior already
    has each such torsion's fitted marginal; the CNF learns the correlations. ``forward`` accepts
    s on any branch; ``inverse`` returns s in [-pi, pi).

    Which torsions go on the circle: those that rotate. A torsion confined to an arc (a peak with
    an empty arc opposite) is better cut in that empty arc, as :class:`MarginalInternal` does: on
    the circle, F squeezes the empty arc to nothing and glues the two tails of the peak together
    at s = +-pi, so that whatever depends on which side of the peak the torsion is (bond angles,
    neighbours) jumps there, which a smooth periodic field cannot follow. :meth:`fit` puts a
    torsion on the circle when its emptiest 5-degree bin (smoothed over three) holds at least
    ``min_density`` of the uniform density; the others keep the marginal map to the line.
    Registered as ``"internal-circle"``; :class:`TorusInternal` (``"internal-torus"``) puts every
    torsion on the circle.

    Parameters
    ----------
    ic, mean, std, cut, mass
        As :class:`MarginalInternal`; the entries of ``mean`` and ``std`` at the torsions on the
        circle must be 0 and 1 (the angle itself is the CNF coordinate).
    on_circle : Tensor (N - 3,) of bool, optional
        Which torsions stay on the circle (default: all).
    """

    name = "internal-circle"

    def __init__(self, ic: InternalCoordinates, mean: torch.Tensor, std: torch.Tensor, cut: torch.Tensor,
                 mass: torch.Tensor, on_circle: Optional[torch.Tensor] = None):
        super().__init__(ic, mean, std, cut, mass)
        m = self.n_atoms - 3
        on_circle = torch.ones(m, dtype=torch.bool) if on_circle is None else torch.as_tensor(on_circle).bool()
        if on_circle.shape != (m,):
            raise ValueError(f"internal-circle: on_circle needs one entry per torsion ({m}), "
                             f"got {tuple(on_circle.shape)}")
        if not (bool((self.mean[5::3][on_circle] == 0).all()) and bool((self.std[5::3][on_circle] == 1).all())):
            raise ValueError("internal-circle: the mean and std of torsions on the circle must be 0 and 1 "
                             "(angles are not rescaled)")
        self.register_buffer("on_circle", on_circle.clone())
        self.all_on_circle = bool(on_circle.all())

    @classmethod
    def fit(cls, ic: InternalCoordinates, x: torch.Tensor, n_bins: int = 180,
            min_density: float = 0.05) -> "CircularInternal":
        """Normalization of bonds, angles and the torsions on the line, the torsion marginals, and
        which torsions rotate (emptiest smoothed 5-degree bin >= ``min_density`` times the uniform
        density; 0 puts every torsion on the circle), from training Cartesians x (n, 3N) in nm
        (float64)."""
        y, _ = ic.inverse(torch.as_tensor(x, dtype=torch.float64))
        raw = torch.cat([y[:, :3], y[:, 6:]], 1)
        cut = least_populated_angle(raw[:, 5::3])
        mass = torsion_marginals(raw[:, 5::3], cut, n_bins)
        on_circle = emptiest_bin_density(raw[:, 5::3]) >= min_density
        unit = MarginalInternal(ic, torch.zeros(raw.shape[1], dtype=torch.float64),
                                torch.ones(raw.shape[1], dtype=torch.float64), cut, mass)
        v, _ = unit._to_line(raw[:, 5::3])
        mapped = raw.clone()
        mapped[:, 5::3] = v
        mean, std = mapped.mean(0), mapped.std(0).clamp_min(1e-6)
        tmean, tstd = mean[5::3].clone(), std[5::3].clone()
        tmean[on_circle], tstd[on_circle] = 0.0, 1.0
        mean[5::3], std[5::3] = tmean, tstd
        return cls(ic, mean, std, cut, mass, on_circle)

    @classmethod
    def from_state(cls, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> "CircularInternal":
        ic = InternalCoordinates(state["ic.zmatrix"], int(config["n_atoms"]))
        t = cls(ic, state["mean"], state["std"], state["cut"], state["mass"], state.get("on_circle"))
        t.load_state_dict({**state, "on_circle": t.on_circle})
        return t

    def periodic(self) -> List[int]:
        return [5 + 3 * j for j in range(self.n_atoms - 3) if bool(self.on_circle[j])]

    def _to_angle(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """CNF torsion coordinates (B, N - 3): s on the circle (any branch) or v on the line ->
        torsions t (rad) and sum log |dt/ds| (B,)."""
        t, logdet = self._circle_to_angle(v)
        if not self.all_on_circle:
            t, logdet = self._merge(t, logdet, self._line_to_angle(v))
        return t, logdet.sum(-1)

    def _to_line(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Torsions t (B, N - 3) rad, any branch -> CNF coordinates (s in [-pi, pi) on the circle,
        v on the line) and sum log |dt/ds| (B,)."""
        s, logdet = self._angle_to_circle(t)
        if not self.all_on_circle:
            s, logdet = self._merge(s, logdet, self._angle_to_line(t))
        return s, logdet.sum(-1)

    def _merge(self, a: torch.Tensor, logdet: torch.Tensor,
               line: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per torsion: (a, logdet) of the circle where ``on_circle``, the line's values elsewhere."""
        return torch.where(self.on_circle, a, line[0]), torch.where(self.on_circle, logdet, line[1])

    def _circle_to_angle(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """s (B, N - 3), any branch -> t = cut + F^-1((s + pi) / 2 pi) and log |dt/ds| per torsion."""
        u = torch.remainder(v + math.pi, 2.0 * math.pi) / (2.0 * math.pi)
        j = (torch.searchsorted(self.cdf, u.t().contiguous(), right=True).t() - 1).clamp(0, self.n_bins - 1)
        m = self._gather(self.mass, j)
        s = (j.to(v.dtype) + (u - self._gather(self.cdf, j)) / m) * self.width
        logdet = -math.log(2.0 * math.pi) - torch.log(m / self.width)
        return self.cut + s, logdet

    def _angle_to_circle(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Torsions t (B, N - 3) rad, any branch -> s = 2 pi F(t) - pi in [-pi, pi) and log |dt/ds|
        per torsion."""
        s = torch.remainder(t - self.cut, 2.0 * math.pi)
        j = torch.floor(s / self.width).long().clamp(0, self.n_bins - 1)
        m = self._gather(self.mass, j)
        u = self._gather(self.cdf, j) + m * ((s - j.to(s.dtype) * self.width) / self.width)
        v = 2.0 * math.pi * u - math.pi
        v = torch.where(v >= math.pi, v - 2.0 * math.pi, v)
        logdet = -math.log(2.0 * math.pi) - torch.log(m / self.width)
        return v, logdet


@register_transform
class TorusInternal(CircularInternal):
    """:class:`CircularInternal` with every torsion on the circle (``min_density = 0``), whether it
    rotates or not: the flow lives on R^a x T^(N - 3). Registered as ``"internal-torus"``."""

    name = "internal-torus"

    @classmethod
    def fit(cls, ic: InternalCoordinates, x: torch.Tensor, n_bins: int = 180,
            min_density: float = 0.0) -> "TorusInternal":
        """As :meth:`CircularInternal.fit`, every torsion on the circle by default."""
        return super().fit(ic, x, n_bins, min_density)
