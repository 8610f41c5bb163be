"""Hybrid MD / flow Monte Carlo (and plain MD) through openmmtools, with checkpoints.

Each iteration applies an openmmtools ``LangevinDynamicsMove`` and then a
:class:`~openmm_flowpert.FlowPerturbationMove` (omitted for plain MD) to one ``SamplerState``;
because the move refreshes the auxiliary directions exactly after MD (ALGORITHM.md section 4), the
chain samples the Boltzmann distribution of the system at ``temperature``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .._files import atomic_write

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
    """

    positions: np.ndarray
    reduced_energies: np.ndarray
    accepted: np.ndarray
    proposed: np.ndarray
    wall_times: np.ndarray

    @property
    def acceptance(self) -> float:
        """Accepted / proposed flow moves over the run (NaN for plain MD)."""
        p = int(self.proposed.sum())
        return float(self.accepted.sum()) / p if p else float("nan")

    def __len__(self) -> int:
        return int(self.reduced_energies.shape[0])


def _save(path: str, **arrays) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def run_hybrid(system, positions, temperature: float, flow=None, *, n_iterations: Optional[int] = None,
               seconds: Optional[float] = None, md_steps: int = 500, n_proposals: int = 16,
               estimator: str = "fp++", timestep_fs: float = 1.0, friction: float = 1.0, seed: int = 0,
               checkpoint: Optional[str] = None, checkpoint_every: int = 50, platform: Optional[str] = None,
               progress: bool = True, desc: Optional[str] = None, device: Optional[str] = None,
               callback: Optional[Callable[[int, np.ndarray], None]] = None) -> HybridResult:
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
    n_proposals, estimator, device : flow move settings (see :class:`~openmm_flowpert.FlowPerturbationMove`;
        ``device`` is the torch device of the flow, e.g. ``"cuda"``).
    seed : int
        Seeds the Langevin integrator and the flow move's noise.
    checkpoint : str, optional
        ``.npz`` file written atomically every ``checkpoint_every`` iterations and at the end
        (trace, positions, velocities, move counters). If it exists, the run resumes from it and
        ``n_iterations`` / ``seconds`` count the whole run, resumed parts included.
    progress : bool
        tqdm progress bar with the acceptance in its postfix.

    Returns
    -------
    HybridResult
    """
    import openmm
    from openmm import unit
    from openmmtools import cache, states

    from ..energies import platform_candidates
    from ..moves import FlowPerturbationMove
    from ..moves.langevin import SeededLangevinDynamicsMove

    if n_iterations is None and seconds is None:
        raise ValueError("give n_iterations, seconds or both")
    ts = states.ThermodynamicState(system, float(temperature) * unit.kelvin)
    ss = states.SamplerState(np.asarray(positions, dtype=np.float64) * unit.nanometer)
    fpm = None
    if flow is not None:
        fpm = FlowPerturbationMove(flow, n_proposals=n_proposals, estimator=estimator, seed=seed,
                                   platform=platform, reassign_velocities=False, device=device)
    # the energy layer's choice (Reference below SMALL_SYSTEM_ATOMS atoms, GPU platforms first)
    plat = openmm.Platform.getPlatformByName(platform_candidates(system.getNumParticles(), platform)[0])
    cc = cache.ContextCache(capacity=2, platform=plat)
    xs, us, acc, prop, walls = [], [], [], [], []
    elapsed = 0.0
    if checkpoint is not None and os.path.exists(checkpoint):
        ck = np.load(checkpoint)
        if ck["positions"].shape[1:] != (system.getNumParticles(), 3):
            raise ValueError(f"checkpoint {checkpoint!r} is for {ck['positions'].shape[1]} atoms, the system has "
                             f"{system.getNumParticles()}; delete it or choose another output folder")
        xs, us = list(ck["positions"]), list(ck["reduced_energies"])
        acc, prop, walls = list(ck["accepted"]), list(ck["proposed"]), list(ck["wall_times"])
        elapsed = float(walls[-1]) if walls else 0.0
        ss.positions = ck["state_positions"] * unit.nanometer
        ss.velocities = ck["state_velocities"] * unit.nanometer / unit.picosecond
        if fpm is not None:
            fpm._calls = int(ck["move_calls"])
    # a resumed run continues with fresh Langevin noise (seeded by the iteration it resumes at)
    md = SeededLangevinDynamicsMove(seed=seed + len(us), timestep=timestep_fs * unit.femtosecond,
                                    collision_rate=friction / unit.picosecond, n_steps=int(md_steps),
                                    reassign_velocities=False)
    kT = unit.MOLAR_GAS_CONSTANT_R * float(temperature) * unit.kelvin

    def done() -> bool:
        return ((n_iterations is not None and len(us) >= n_iterations)
                or (seconds is not None and elapsed >= seconds))

    def write() -> None:
        if checkpoint is None:
            return
        _save(checkpoint, positions=np.asarray(xs), reduced_energies=np.asarray(us), accepted=np.asarray(acc),
              proposed=np.asarray(prop), wall_times=np.asarray(walls),
              state_positions=np.asarray(ss.positions.value_in_unit(unit.nanometer)),
              state_velocities=np.asarray(ss.velocities.value_in_unit(unit.nanometer / unit.picosecond)),
              move_calls=np.asarray(fpm._calls if fpm is not None else 0))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_iterations if seconds is None else None, initial=len(us),
                   desc=desc or ("hybrid MD + FP" if fpm else "plain MD"), unit="it")
    t_last = time.perf_counter()
    while not done():
        md.apply(ts, ss, cc)
        a = p = 0
        if fpm is not None:
            before = fpm.n_accepted, fpm.n_proposed
            fpm.apply(ts, ss, cc)
            a, p = fpm.n_accepted - before[0], fpm.n_proposed - before[1]
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        x = np.asarray(ss.positions.value_in_unit(unit.nanometer))
        xs.append(x)
        us.append(float(ss.potential_energy / kT))
        acc.append(a)
        prop.append(p)
        walls.append(elapsed)
        if callback is not None:
            callback(len(us), x)
        if bar is not None:
            bar.update(1)
            if fpm is not None:
                bar.set_postfix(acceptance=f"{sum(acc) / max(sum(prop), 1):.3f}")
        if len(us) % checkpoint_every == 0:
            write()
    write()
    if bar is not None:
        bar.close()
    return HybridResult(np.asarray(xs), np.asarray(us), np.asarray(acc, dtype=np.int64),
                        np.asarray(prop, dtype=np.int64), np.asarray(walls))
