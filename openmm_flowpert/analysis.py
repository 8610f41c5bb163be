"""Observables and their error bars: backbone dihedrals, basin populations, effective sample sizes.

Error bars of time series use the statistical inefficiency g of :func:`pymbar.timeseries.statistical_inefficiency`
(SE = std * sqrt(g / n)); angles are in radians, positions in nm.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["backbone_dihedrals", "mean_and_se", "phi_populations", "PHI_BASIN"]

#: The rare left-handed basin of alanine dipeptide used by the replica-exchange reference (rad).
PHI_BASIN = (0.0, 2.5)


def backbone_dihedrals(positions: np.ndarray, topology) -> Tuple[np.ndarray, np.ndarray]:
    """phi and psi (n_frames, n_residues_with_both) in rad, via mdtraj, for positions (n, N, 3) nm."""
    import mdtraj as md

    top = topology if isinstance(topology, md.Topology) else md.Topology.from_openmm(topology)
    traj = md.Trajectory(np.asarray(positions, dtype=np.float32).reshape(-1, top.n_atoms, 3), top)
    _, phi = md.compute_phi(traj)
    _, psi = md.compute_psi(traj)
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        raise ValueError("the topology has no backbone phi/psi dihedrals (not a peptide?)")
    return phi, psi


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


def phi_populations(phi: np.ndarray, basin: Tuple[float, float] = PHI_BASIN) -> Dict[str, Tuple[float, float, float]]:
    """Populations (mean, SE, g) of phi < 0 and of ``basin[0] < phi < basin[1]`` (first residue)."""
    p = np.asarray(phi)[:, 0] if np.ndim(phi) == 2 else np.asarray(phi)
    return {"phi<0": mean_and_se((p < 0).astype(float)),
            f"{basin[0]:g}<phi<{basin[1]:g}": mean_and_se(((p > basin[0]) & (p < basin[1])).astype(float))}


def effective_samples(values: np.ndarray) -> Optional[float]:
    """n / g of a time series (None if it never changes)."""
    m, se, g = mean_and_se(values)
    return None if se == 0 else len(values) / g
