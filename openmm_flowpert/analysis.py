"""Observables and their error bars: backbone dihedrals, basin populations, effective sample sizes.

Error bars of time series use the statistical inefficiency g of :func:`pymbar.timeseries.statistical_inefficiency`
(SE = std * sqrt(g / n)); angles are in radians, positions in nm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["backbone_dihedrals", "DihedralRegion", "mean_and_se", "phi_populations", "PHI_BASIN", "ca_distances",
           "rmsd_to", "select_ca_pair", "weighted_mean_and_se", "recycled_mean_and_se", "gpd_fit", "pareto_khat"]

#: The rare left-handed basin of alanine dipeptide used by the replica-exchange reference (rad).
PHI_BASIN = (0.0, 2.5)


def backbone_dihedrals(positions: np.ndarray, topology) -> Tuple[np.ndarray, np.ndarray]:
    """phi and psi in rad, (n_frames, n_residues) each, column j of both from the same residue.

    Only residues that have both angles count (capped dipeptides: the one residue; an uncapped
    peptide: all but its two ends). Positions (n, N, 3) in nm; computed by mdtraj.
    """
    import mdtraj as md

    traj = _mdtraj(positions, topology)
    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    # phi_i = (C_{i-1}, N_i, CA_i, C_i) and psi_i = (N_i, CA_i, C_i, N_{i+1}): pair them by N_i
    col = {int(n): j for j, n in enumerate(psi_idx[:, 0])}
    pairs = [(i, col[int(n)]) for i, n in enumerate(phi_idx[:, 1]) if int(n) in col]
    if not pairs:
        raise ValueError("the topology has no residue with both backbone phi and psi (not a peptide?)")
    a, b = (list(c) for c in zip(*pairs))
    return phi[:, a], psi[:, b]


@dataclass(frozen=True)
class DihedralRegion:
    """A conformational region given by the range of one dihedral: backbone phi or psi (any residue that
    has both) or the dihedral of four atoms.

    Parameters
    ----------
    angle : str
        ``"phi"``, ``"psi"`` or four 0-based atom indices joined by ``-`` (``"4-6-8-14"``).
    low, high : float
        The open range (low, high) in rad, each in [-pi, pi]; ``low > high`` is the range that wraps
        through +-pi (angle > low or angle < high).

    Examples
    --------
    >>> region = DihedralRegion.parse("phi:0:2.5")     # alanine dipeptide's rare left-handed basin
    >>> region.fraction(positions, topology)          # doctest: +SKIP
    """

    angle: str
    low: float
    high: float

    def __post_init__(self):
        for v in (self.low, self.high):
            if not math.isfinite(v) or abs(v) > math.pi + 1e-3:  # 3.1416 for pi is fine
                hint = " (degrees? give radians)" if 2 * math.pi < abs(v) <= 360 else ""
                raise ValueError(f"dihedral range bound {v:g} is not an angle in [-pi, pi] rad{hint}")
        if self.low == self.high:
            raise ValueError(f"dihedral range ({self.low:g}, {self.high:g}) is empty; give LOW != HIGH (rad)")
        if self.angle not in ("phi", "psi"):
            parts = self.angle.split("-")
            if len(parts) != 4 or not all(p.isdigit() for p in parts) or len(set(parts)) != 4:
                raise ValueError(f"dihedral {self.angle!r}: give phi, psi or four different 0-based atom indices "
                                 f"joined by '-', e.g. 4-6-8-14")

    @classmethod
    def parse(cls, text: str) -> "DihedralRegion":
        """``ANGLE:LOW:HIGH`` (rad), e.g. ``phi:0:2.5`` or ``4-6-8-14:-3.14:-2.5``; raises ValueError."""
        usage = (f"region {text!r}: give ANGLE:LOW:HIGH in rad, e.g. phi:0:2.5 (ANGLE: phi, psi or four atom "
                 f"indices like 4-6-8-14)")
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(usage)
        try:
            low, high = float(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(usage) from None
        return cls(parts[0].strip(), low, high)

    def angles(self, positions: np.ndarray, topology) -> np.ndarray:
        """The dihedral(s) in rad, (n_frames, n_residues) for phi / psi, (n_frames, 1) for four atoms.
        Positions (n, N, 3) in nm; topology an OpenMM or mdtraj topology."""
        if self.angle in ("phi", "psi"):
            return backbone_dihedrals(positions, topology)[0 if self.angle == "phi" else 1]
        import mdtraj as md

        traj = _mdtraj(positions, topology)
        idx = [int(i) for i in self.angle.split("-")]
        if max(idx) >= traj.n_atoms:
            raise ValueError(f"dihedral {self.angle!r}: atom index {max(idx)} is out of range for {traj.n_atoms} "
                             f"atoms (indices are 0-based)")
        return md.compute_dihedrals(traj, [idx]).astype(np.float64)

    def fraction(self, positions: np.ndarray, topology) -> np.ndarray:
        """Per frame (n,): the fraction of the dihedrals (one per residue for phi / psi) inside the range."""
        a = self.angles(positions, topology)
        inside = (a > self.low) & (a < self.high) if self.low < self.high else (a > self.low) | (a < self.high)
        return inside.mean(axis=1)


def _pymbar_timeseries():
    """pymbar.timeseries without its import banner and its per-call caution (stated in our docs)."""
    import contextlib
    import io
    import logging

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from pymbar import timeseries
    logging.getLogger("pymbar.timeseries").setLevel(logging.ERROR)
    return timeseries


def mean_and_se(values: np.ndarray) -> Tuple[float, float, float]:
    """Mean, standard error and statistical inefficiency g of a time series.

    g from pymbar's ``statistical_inefficiency`` (1 for a constant series). A series with no
    variation gets SE 0: report it as "no transitions observed", not as a precise value.
    """
    timeseries = _pymbar_timeseries()
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or v.std() == 0:
        return float(v.mean()) if v.size else float("nan"), 0.0, 1.0
    g = float(timeseries.statistical_inefficiency(v))
    return float(v.mean()), float(v.std() * math.sqrt(g / v.size)), g


def phi_populations(phi: np.ndarray, basin: Tuple[float, float] = PHI_BASIN,
                    probabilities: Optional[np.ndarray] = None) -> Dict[str, Tuple[float, float, float]]:
    """Populations (mean, SE, g) of phi < 0 and of ``basin[0] < phi < basin[1]`` (rad).

    Without ``probabilities``: ``phi`` is a time series, (n,) or (n, n_residues) (first residue
    used), and g is its statistical inefficiency. With ``probabilities`` (n_iterations, n + 1), the
    law of each ``selection="weights"`` draw (``HybridResult.candidate_probabilities``): ``phi`` is
    (n_iterations, n + 1), the first residue's phi at every point each apply weighed, and the
    estimate is Rao-Blackwellized (:func:`recycled_mean_and_se`); g is then n_iterations / ESS, the
    inefficiency relative to one independent sample per iteration.
    """
    p = np.asarray(phi)
    if probabilities is None:
        p = p[:, 0] if p.ndim == 2 else p
        est = mean_and_se
    else:
        def est(v):
            m, se, ess = recycled_mean_and_se(v, probabilities)
            return m, se, (v.shape[0] / ess if ess > 0 else float("inf"))
    return {"phi<0": est((p < 0).astype(float)),
            f"{basin[0]:g}<phi<{basin[1]:g}": est(((p > basin[0]) & (p < basin[1])).astype(float))}


def _mdtraj(positions: np.ndarray, topology):
    import mdtraj as md

    top = topology if isinstance(topology, md.Topology) else md.Topology.from_openmm(topology)
    return md.Trajectory(np.asarray(positions, dtype=np.float32).reshape(-1, top.n_atoms, 3), top)


def ca_distances(positions: np.ndarray, topology, pairs) -> np.ndarray:
    """Distances (n_frames, n_pairs) in nm between the C-alpha atoms of residue pairs.

    ``pairs``: (i, j) residue indices (0-based, in topology order), one pair or a list of pairs.
    """
    import mdtraj as md

    traj = _mdtraj(positions, topology)
    pairs = np.atleast_2d(np.asarray(pairs, dtype=int))
    ca = {a.residue.index: a.index for a in traj.topology.atoms if a.name == "CA"}
    missing = [int(r) for r in pairs.ravel() if int(r) not in ca]
    if missing:
        raise ValueError(f"residues {missing} have no C-alpha atom (residue indices are 0-based)")
    return md.compute_distances(traj, [[ca[int(i)], ca[int(j)]] for i, j in pairs]).astype(np.float64)


def rmsd_to(positions: np.ndarray, reference: np.ndarray, topology, selection: str = "name CA") -> np.ndarray:
    """RMSD (n_frames,) in nm of ``positions`` to ``reference`` (N, 3) nm after optimal superposition
    of the atoms of the mdtraj ``selection`` (default: C-alpha atoms)."""
    import mdtraj as md

    traj = _mdtraj(positions, topology)
    ref = _mdtraj(reference, traj.topology)
    atoms = traj.topology.select(selection)
    if len(atoms) == 0:
        raise ValueError(f"the selection {selection!r} matches no atoms")
    return md.rmsd(traj, ref, 0, atom_indices=atoms).astype(np.float64)


def select_ca_pair(folded: np.ndarray, unfolded: np.ndarray, topology, min_separation: int = 3):
    """The C-alpha pair that best separates two ensembles (positions (n, N, 3) nm each).

    Score of a pair: the Fisher ratio (mean_u - mean_f)^2 / (var_f + var_u) of its distance, over
    residue pairs at least ``min_separation`` apart in sequence. Returns ((i, j), score, table) with
    0-based residue indices and ``table`` a list of (i, j, score, mean_folded, mean_unfolded) sorted
    by score (nm).
    """
    traj = _mdtraj(folded[:1], topology)
    res = sorted({a.residue.index for a in traj.topology.atoms if a.name == "CA"})
    pairs = [(i, j) for k, i in enumerate(res) for j in res[k + 1:] if j - i >= min_separation]
    df, du = ca_distances(folded, topology, pairs), ca_distances(unfolded, topology, pairs)
    score = (du.mean(0) - df.mean(0)) ** 2 / (df.var(0) + du.var(0) + 1e-12)
    table = sorted(((int(i), int(j), float(s), float(a), float(b)) for (i, j), s, a, b in
                    zip(pairs, score, df.mean(0), du.mean(0))), key=lambda r: -r[2])
    return (table[0][0], table[0][1]), table[0][2], table


def weighted_mean_and_se(values: np.ndarray, weights: np.ndarray) -> Tuple[float, float]:
    """Self-normalized importance-sampling estimate of E[values] and its delta-method standard error
    sqrt(sum_i w_i^2 (v_i - mean)^2) with normalized weights w. For SMC walkers that share ancestors the
    SE is a lower bound: repeat independent runs for an honest error bar. The mean is kept inside
    [min(values), max(values)], where it lies exactly (rounding can leave a fraction at 1 + 2e-16)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    w = w / w.sum()
    m = float(np.clip((w * v).sum(), v.min(), v.max()))
    return m, float(np.sqrt((w ** 2 * (v - m) ** 2).sum()))


def recycled_mean_and_se(values: np.ndarray, probabilities: np.ndarray) -> Tuple[float, float, float]:
    """Rao-Blackwellized ("waste-recycling") estimate of E[values] from a chain of
    ``selection="weights"`` flow moves, its standard error and its effective sample size.

    ``values`` and ``probabilities`` are (n_iterations, n + 1): an observable at each apply's n + 1
    points and the law of that apply's draw among them (``FlowPerturbationMove.candidates``, rows
    summing to 1; the hybrid sampler stores them). Each row's mean under its law is the conditional
    expectation of the observable at the chain's next state, so the series of row means has the
    target's expectation at stationarity and no larger variance per step than the chain's own
    values (Rao-Blackwell; Tjelmeland 2004, Frenkel 2004). The SE is that of the series of row means
    (pymbar's statistical inefficiency); the effective sample size is the target variance of the
    observable (pooled over all points with their probabilities) over SE^2, so it is comparable
    with n/g of a plain chain and with Kish's ESS of importance sampling. Returns (mean, SE, ESS).
    """
    v = np.asarray(values, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if v.shape != p.shape or v.ndim != 2:
        raise ValueError(f"values and probabilities must both be (n_iterations, n + 1), got {v.shape} and {p.shape}")
    p = p / p.sum(1, keepdims=True)
    rows = np.where(p > 0, v, 0.0)
    rows = (p * rows).sum(1)
    m, se, _ = mean_and_se(rows)
    var = float((p * np.where(p > 0, v - m, 0.0) ** 2).sum() / p.shape[0])
    return m, se, (var / se ** 2 if se > 0 else float(p.shape[0]))


def gpd_fit(y: np.ndarray) -> Tuple[float, float]:
    """Fit a generalized Pareto distribution to exceedances ``y > 0``: returns (xi, sigma).

    The density is (1/sigma) (1 + xi y / sigma)^(-1/xi - 1). With b = xi / sigma, the maximum of
    the likelihood over xi at fixed b is xi(b) = mean(log(1 + b y)), which leaves the profile
    log-likelihood l(b) = n [log(b / xi(b)) - xi(b) - 1]. Following Zhang & Stephens (2009), b is
    the posterior mean of l over a grid of m = 30 + sqrt(n) points below the support limit
    b > -1 / max(y), spread from the first quartile of y; then xi = xi(b), sigma = xi / b.
    """
    y = np.sort(np.asarray(y, dtype=np.float64).reshape(-1))
    n = y.size
    if n < 5 or not np.all(np.isfinite(y)) or y[0] <= 0:
        raise ValueError(f"gpd_fit needs at least 5 finite exceedances > 0, got {n}")
    m = 30 + int(math.sqrt(n))
    quartile = y[max(int(n / 4 + 0.5) - 1, 0)]
    j = np.arange(1, m + 1, dtype=np.float64)
    b = -1.0 / y[-1] + (np.sqrt(m / (j - 0.5)) - 1.0) / (3.0 * quartile)
    xi = np.log1p(b[:, None] * y[None, :]).mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = n * (np.log(b / xi) - xi - 1.0)
    ll = np.where(np.isfinite(ll), ll, -np.inf)
    post = np.exp(ll - ll.max())
    b_hat = float((b * post).sum() / post.sum())
    xi_hat = float(np.log1p(b_hat * y).mean())
    return xi_hat, xi_hat / b_hat


def pareto_khat(log_w: np.ndarray) -> float:
    """Pareto shape k of the tail of importance weights exp(log_w) (non-finite entries dropped).

    The largest M = min(n / 5, 3 sqrt(n)) weights, less the next one, are fitted with
    :func:`gpd_fit`, and the shape is pulled toward 0.5 by a weak prior worth 10 points
    (Vehtari et al., "Pareto smoothed importance sampling", JMLR 2024). Reading it: the weights
    have about 1/k finite moments, so for k < 0.5 their variance is finite and Kish's ESS and the
    delta-method SE of an importance estimate converge as usual; for 0.5 <= k < 0.7 they converge
    slowly and a few thousand draws can misstate them by a factor of two; for k >= 0.7 neither is
    reliable at any practical n. A diagnostic with an error of about (1 + k) / sqrt(M).
    """
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    lw = lw[np.isfinite(lw)]
    n = lw.size
    m = int(min(n / 5.0, 3.0 * math.sqrt(n)))
    if m < 5:
        raise ValueError(f"pareto_khat needs at least 25 finite log-weights, got {n}")
    lw = np.sort(lw - lw.max())
    tail, cut = np.exp(lw[-m:]), math.exp(lw[-m - 1])
    exceed = tail - cut
    exceed = exceed[exceed > 0]
    if exceed.size < 5:  # ties at the top: no tail to fit
        return float("nan")
    k, _ = gpd_fit(exceed)
    return float((exceed.size * k + 10 * 0.5) / (exceed.size + 10))
