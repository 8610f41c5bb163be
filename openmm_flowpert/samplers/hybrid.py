"""Hybrid MD / flow Monte Carlo (and plain MD) through openmmtools, with checkpoints.

Each iteration applies an openmmtools ``LangevinDynamicsMove`` and then a
:class:`~openmm_flowpert.FlowPerturbationMove` (omitted for plain MD) to one ``SamplerState``;
because the move refreshes the auxiliary directions exactly after MD (docs/algorithm.md section 4), the
chain samples the Boltzmann distribution of the system at ``temperature``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .._files import load_checkpoint, save_checkpoint

__all__ = ["HybridResult", "run_hybrid"]


@dataclass
class HybridResult:
    """Trace of a hybrid (or plain MD) run, one entry per iteration.

    Attributes
    ----------
    positions : ndarray (n_iterations, N, 3), nm
    reduced_energies : ndarray (n_iterations,), kT at the run's temperature
    accepted, proposed : ndarray (n_iterations,), int
        Flow proposals accepted / made in each iteration (0 for plain MD).
    wall_times : ndarray (n_iterations,), s
        Cumulative wall time after each iteration (continues across resumes).
    candidate_positions, candidate_energies, candidate_probabilities : ndarray or None
        With ``record_candidates=True``: each apply's n + 1 points ((n_iterations, n + 1, N, 3) nm,
        float32), their reduced energies ((n_iterations, n + 1) kT) and the law of the move's draw
        among them ((n_iterations, n + 1)), for :meth:`recycled_mean`. None otherwise.
    """

    positions: np.ndarray
    reduced_energies: np.ndarray
    accepted: np.ndarray
    proposed: np.ndarray
    wall_times: np.ndarray
    candidate_positions: Optional[np.ndarray] = None
    candidate_energies: Optional[np.ndarray] = None
    candidate_probabilities: Optional[np.ndarray] = None

    @property
    def acceptance(self) -> float:
        """Accepted / proposed flow moves over the run (NaN for plain MD)."""
        p = int(self.proposed.sum())
        return float(self.accepted.sum()) / p if p else float("nan")

    def __len__(self) -> int:
        return int(self.reduced_energies.shape[0])

    def recycled_mean(self, observable: Callable[[np.ndarray], np.ndarray]) -> Tuple[float, float, float]:
        """Rao-Blackwellized estimate (mean, SE, ESS) of an observable over every point the flow move
        weighed (:func:`~openmm_flowpert.analysis.recycled_mean_and_se`); ``observable`` maps
        positions (B, N, 3) nm to values (B,). Needs ``run_hybrid(..., record_candidates=True)``."""
        from ..analysis import recycled_mean_and_se

        values = np.asarray(observable(self._flat_candidates().astype(np.float64)))
        return recycled_mean_and_se(values.reshape(self.candidate_probabilities.shape), self.candidate_probabilities)

    def recycled_phi_populations(self, topology) -> Dict[str, Tuple[float, float, float]]:
        """Rao-Blackwellized populations (mean, SE, g) of phi < 0 and 0 < phi < 2.5 rad (the first
        residue's phi) over every point the flow move weighed, as
        :func:`~openmm_flowpert.analysis.phi_populations` with the draw probabilities (g =
        n_iterations / ESS). Needs ``run_hybrid(..., record_candidates=True)``."""
        from ..analysis import backbone_dihedrals, phi_populations

        phi = backbone_dihedrals(self._flat_candidates(), topology)[0][:, 0]
        return phi_populations(phi.reshape(self.candidate_probabilities.shape),
                               probabilities=self.candidate_probabilities)

    def _flat_candidates(self) -> np.ndarray:
        """Every recorded point, (n_iterations * (n + 1), N, 3) nm, in row order of the probabilities."""
        if self.candidate_positions is None:
            raise ValueError("this run recorded no candidates: run_hybrid(..., record_candidates=True)")
        return self.candidate_positions.reshape(-1, *self.candidate_positions.shape[2:])


def _config(system, temperature, flow, md_steps, n_proposals, estimator, timestep_fs, friction, seed,
            selection) -> dict:
    from ..perturbed_flow import PerturbedFlow, file_checksum

    path = None if flow is None else (flow.path if isinstance(flow, PerturbedFlow) else os.fspath(flow))
    return {"n_atoms": int(system.getNumParticles()), "temperature_K": float(temperature),
            "flow_sha256": file_checksum(path) if path and os.path.isfile(path) else path,
            "md_steps": int(md_steps), "n_proposals": int(n_proposals) if flow is not None else 0,
            "estimator": estimator if flow is not None else None, "timestep_fs": float(timestep_fs),
            "friction_per_ps": float(friction), "seed": int(seed),
            # newer settings enter only when not the default, so older checkpoints still resume
            **({"selection": selection} if selection != "metropolis" else {})}


_CANDIDATE_KEYS = ("candidate_positions", "candidate_energies", "candidate_probabilities")


class _Trace:
    """The per-iteration record of a hybrid run and its checkpoint payload."""

    def __init__(self, ck: Optional[dict] = None, record_candidates: bool = False):
        ck = ck or {}
        self.record_candidates = bool(record_candidates)
        self.xs, self.us = list(ck.get("positions", [])), list(ck.get("reduced_energies", []))
        self.acc, self.prop = list(ck.get("accepted", [])), list(ck.get("proposed", []))
        self.walls = list(ck.get("wall_times", []))
        self.cand = {k: list(ck[k]) for k in _CANDIDATE_KEYS if k in ck}

    def __len__(self) -> int:
        return len(self.us)

    @property
    def elapsed(self) -> float:
        return float(self.walls[-1]) if self.walls else 0.0

    def append(self, x, u, a, p, wall) -> None:
        self.xs.append(x)
        self.us.append(u)
        self.acc.append(a)
        self.prop.append(p)
        self.walls.append(wall)

    def add_candidates(self, candidates, n_points: int) -> None:
        """One apply's points, padded to ``n_points`` rows of probability 0 (a skipped apply has one)."""
        pad = n_points - candidates.positions.shape[0]
        rows = (np.concatenate([candidates.positions, np.repeat(candidates.positions[:1], pad, 0)]).astype(np.float32),
                np.concatenate([candidates.reduced_energies, np.repeat(candidates.reduced_energies[:1], pad)]),
                np.concatenate([candidates.probabilities, np.zeros(pad)]))
        for key, row in zip(_CANDIDATE_KEYS, rows):
            self.cand.setdefault(key, []).append(row)

    def payload(self) -> dict:
        return {"positions": np.asarray(self.xs), "reduced_energies": np.asarray(self.us),
                "accepted": np.asarray(self.acc, dtype=np.int64), "proposed": np.asarray(self.prop, dtype=np.int64),
                "wall_times": np.asarray(self.walls), **{k: np.asarray(v) for k, v in self.cand.items()}}

    def result(self) -> HybridResult:
        p = self.payload()
        return HybridResult(p["positions"], p["reduced_energies"], p["accepted"], p["proposed"], p["wall_times"],
                            *(p.get(k) for k in _CANDIDATE_KEYS))


def run_hybrid(system, positions, temperature: float, flow=None, *, n_iterations: Optional[int] = None,
               seconds: Optional[float] = None, md_steps: int = 500, n_proposals: int = 16,
               estimator: str = "fp++", timestep_fs: float = 1.0, friction: float = 1.0, seed: int = 0,
               checkpoint: Optional[str] = None, checkpoint_every: int = 50, platform: Optional[str] = None,
               progress: bool = True, desc: Optional[str] = None, device: Optional[str] = None,
               callback: Optional[Callable[[int, np.ndarray], None]] = None, selection: str = "weights",
               record_candidates: bool = False) -> HybridResult:
    """Run hybrid MD + flow-perturbation MC (or plain MD if ``flow`` is None) in openmmtools.

    Parameters
    ----------
    system : openmm.System
        Unconstrained, non-periodic (checked by the flow move).
    positions : array (N, 3), nm
        Starting positions.
    temperature : float
        K.
    flow : PerturbedFlow or str, optional
        The flow (or its file). None: plain Langevin MD, same loop.
    n_iterations, seconds : int, float
        Stop after this many iterations and/or this much wall time (at least one must be given).
    md_steps : int
        Langevin steps (``timestep_fs`` fs, ``friction`` 1/ps) per iteration.
    n_proposals, estimator, device, selection : flow move settings (see
        :class:`~openmm_flowpert.FlowPerturbationMove`; ``device`` is the torch device of the flow,
        e.g. ``"cuda"``; ``selection`` defaults to ``"weights"``, ``"metropolis"`` is the chain of
        tests that was the default before 2026-12-06, which a checkpoint written then resumes with).
    record_candidates : bool
        Keep every apply's n + 1 points and the law of its draw (needs ``selection="weights"``) for
        the Rao-Blackwellized estimate :meth:`HybridResult.recycled_mean`, which uses every
        proposal the move weighed instead of the one state it keeps (about n + 1 times the
        trajectory's memory, float32 positions).
    seed : int
        Seeds the Langevin integrator and the flow move's noise.
    checkpoint : str, optional
        File written atomically every ``checkpoint_every`` iterations and at the end (trace,
        positions, velocities, move counters). If it exists, the run resumes from it (refusing a
        checkpoint of other settings) and ``n_iterations`` / ``seconds`` count the whole run,
        resumed parts included.
    progress : bool
        tqdm progress bar with the acceptance in its postfix.

    Returns
    -------
    HybridResult
    """
    from openmm import unit
    from openmmtools import states

    if n_iterations is None and seconds is None:
        raise ValueError("give n_iterations, seconds or both")
    if record_candidates and (flow is None or selection != "weights"):
        raise ValueError("record_candidates=True needs a flow and selection='weights' (the recorded law is "
                         "that of the weighted draw)")
    config = _config(system, temperature, flow, md_steps, n_proposals, estimator, timestep_fs, friction, seed,
                     selection)
    if record_candidates:
        config["record_candidates"] = True
    ck = load_checkpoint(checkpoint, "hybrid", config)
    trace = _Trace(ck, record_candidates)
    ts = states.ThermodynamicState(system, float(temperature) * unit.kelvin)
    ss = states.SamplerState(np.asarray(positions, dtype=np.float64) * unit.nanometer)
    fpm = None
    if flow is not None:
        from ..moves import FlowPerturbationMove

        # Velocities are redrawn after an accepted move: the Langevin segment's stored velocities lag
        # the positions by half a step and would heat the system if carried to the new positions.
        fpm = FlowPerturbationMove(flow, n_proposals=n_proposals, estimator=estimator, seed=seed,
                                   platform=platform, reassign_velocities=True, device=device, selection=selection)
    if ck is not None:
        ss.positions = ck["state_positions"] * unit.nanometer
        ss.velocities = ck["state_velocities"] * unit.nanometer / unit.picosecond
        if fpm is not None:
            fpm._calls = int(ck["move_calls"])

    def write() -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, "hybrid", config, {
                **trace.payload(), "state_positions": np.asarray(ss.positions.value_in_unit(unit.nanometer)),
                "state_velocities": np.asarray(ss.velocities.value_in_unit(unit.nanometer / unit.picosecond)),
                "move_calls": fpm._calls if fpm is not None else 0})

    def done() -> bool:
        return ((n_iterations is not None and len(trace) >= n_iterations)
                or (seconds is not None and trace.elapsed >= seconds))

    _loop(ts, ss, fpm, trace, done, write, checkpoint_every, platform,
          dict(seed=seed, timestep_fs=timestep_fs, friction=friction, md_steps=md_steps),
          progress and (desc or ("hybrid MD + FP" if fpm else "plain MD")), n_iterations if seconds is None else None,
          callback)
    return trace.result()


def _loop(ts, ss, fpm, trace: _Trace, done, write, checkpoint_every: int, platform, md: dict, desc, total,
          callback) -> None:
    """MD segment, then the flow move, until ``done()``; the trace gets one entry per iteration."""
    import openmm
    from openmm import unit
    from openmmtools import cache

    from ..energies import kT_kJ_per_mol, platform_candidates
    from ..moves.langevin import SeededLangevinDynamicsMove

    # the energy layer's choice (Reference below SMALL_SYSTEM_ATOMS atoms, GPU platforms first)
    plat = openmm.Platform.getPlatformByName(platform_candidates(ts.system.getNumParticles(), platform)[0])
    cc = cache.ContextCache(capacity=2, platform=plat)
    # a resumed run continues with fresh Langevin noise (seeded by the iteration it resumes at)
    langevin = SeededLangevinDynamicsMove(seed=md["seed"] + len(trace), timestep=md["timestep_fs"] * unit.femtosecond,
                                          collision_rate=md["friction"] / unit.picosecond, n_steps=int(md["md_steps"]),
                                          reassign_velocities=False)
    kT = kT_kJ_per_mol(ts.temperature)
    bar = None
    if desc:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=len(trace), desc=desc, unit="it")
    elapsed, t_last = trace.elapsed, time.perf_counter()
    while not done():
        langevin.apply(ts, ss, cc)
        a = p = 0
        if fpm is not None:
            before = fpm.n_accepted, fpm.n_proposed
            fpm.apply(ts, ss, cc)
            a, p = fpm.n_accepted - before[0], fpm.n_proposed - before[1]
            if trace.record_candidates:
                trace.add_candidates(fpm.candidates, fpm.n_proposals + 1)
        now = time.perf_counter()
        elapsed, t_last = elapsed + now - t_last, now
        x = np.asarray(ss.positions.value_in_unit(unit.nanometer))
        trace.append(x, ss.potential_energy.value_in_unit(unit.kilojoule_per_mole) / kT, a, p, elapsed)
        if callback is not None:
            callback(len(trace), x)
        if bar is not None:
            bar.update(1)
            if fpm is not None:
                bar.set_postfix(acceptance=f"{sum(trace.acc) / max(sum(trace.prop), 1):.3f}")
        if len(trace) % checkpoint_every == 0:
            write()
    write()
    if bar is not None:
        bar.close()
