"""Training data and reference runs: Langevin MD and temperature replica exchange in OpenMM.

Positions are in nm, temperatures in K, times in ps. All random paths take a seed (OpenMM's
Langevin integrator seed and a numpy generator for swaps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import openmm
from openmm import unit

from .energies.reduced_potential import kT_kJ_per_mol

__all__ = ["ReplicaExchangeResult", "replica_exchange", "geometric_temperatures", "langevin_md"]


def geometric_temperatures(t_min: float, t_max: float, n: int) -> List[float]:
    """n temperatures (K) spaced geometrically from t_min to t_max."""
    if n == 1:
        return [float(t_min)]
    return [float(t_min * (t_max / t_min) ** (i / (n - 1))) for i in range(n)]


def _context(system, temperature: float, timestep_fs: float, friction: float, seed: int,
             platform: str, threads: int) -> openmm.Context:
    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                            timestep_fs * unit.femtosecond)
    integ.setRandomNumberSeed(int(seed))
    plat = openmm.Platform.getPlatformByName(platform)
    props = {"Threads": str(threads)} if platform == "CPU" else {}
    return openmm.Context(system, integ, plat, props)


@dataclass
class ReplicaExchangeResult:
    """Frames of a replica-exchange run.

    Attributes
    ----------
    temperatures : list of float (K)
    positions : numpy.ndarray, (n_temperatures, n_frames, N, 3) nm
        Frames by *temperature* (not by replica).
    reduced_energies : numpy.ndarray, (n_temperatures, n_frames)
        u = U / kT of each frame at its own temperature.
    swap_acceptance : numpy.ndarray, (n_temperatures - 1,)
        Acceptance of swaps between neighbouring temperatures.
    """

    temperatures: List[float]
    positions: np.ndarray
    reduced_energies: np.ndarray
    swap_acceptance: np.ndarray


def replica_exchange(system, positions, temperatures: Sequence[float], n_frames: int, *,
                     steps_per_swap: int = 500, swaps_per_frame: int = 1, equilibration_swaps: int = 100,
                     timestep_fs: float = 1.0, friction: float = 1.0, seed: int = 0,
                     platform: str = "Reference", progress: bool = True) -> ReplicaExchangeResult:
    """Temperature replica exchange with Langevin dynamics and neighbour swaps.

    Each cycle runs ``steps_per_swap`` Langevin steps in every replica, then attempts swaps
    between neighbouring temperatures (even pairs on even cycles, odd pairs on odd cycles) with
    the exact criterion min(1, exp((beta_i - beta_j) (U_i - U_j))); velocities are rescaled by
    sqrt(T_new / T_old). A frame is stored every ``swaps_per_frame`` cycles.

    Parameters
    ----------
    system : openmm.System
    positions : array (N, 3), nm
    temperatures : increasing temperatures in K; the first is usually the target.
    n_frames : frames stored per temperature after ``equilibration_swaps`` cycles.
    timestep_fs, friction : Langevin time step (fs) and friction (1/ps).
    """
    temps = [float(t) for t in temperatures]
    n = len(temps)
    rng = np.random.default_rng(seed)
    x0 = np.asarray(positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions)
    ctxs = [_context(system, t, timestep_fs, friction, seed * 1000 + i + 1, platform, 1) for i, t in enumerate(temps)]
    for c, t in zip(ctxs, temps):
        c.setPositions(x0)
        c.setVelocitiesToTemperature(t * unit.kelvin, int(rng.integers(1 << 30)))
    kts = np.array([kT_kJ_per_mol(t) for t in temps])
    slot = list(range(n))  # slot[i]: context currently at temperature i
    n_att, n_acc = np.zeros(max(n - 1, 1)), np.zeros(max(n - 1, 1))
    N = x0.shape[0]
    pos = np.zeros((n, n_frames, N, 3))
    red = np.zeros((n, n_frames))
    total = equilibration_swaps + n_frames * swaps_per_frame
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="replica exchange", unit="cycle")
    frame = 0
    for cycle in range(total):
        energies = np.zeros(n)
        for i in range(n):
            c = ctxs[slot[i]]
            c.getIntegrator().step(steps_per_swap)
            energies[i] = c.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        for i in range(cycle % 2, n - 1, 2):
            delta = (1.0 / kts[i] - 1.0 / kts[i + 1]) * (energies[i] - energies[i + 1])
            n_att[i] += 1
            if delta >= 0 or rng.random() < math.exp(delta):
                n_acc[i] += 1
                for a, t_new, t_old in ((slot[i], temps[i + 1], temps[i]), (slot[i + 1], temps[i], temps[i + 1])):
                    st = ctxs[a].getState(getVelocities=True)
                    ctxs[a].setVelocities(st.getVelocities() * math.sqrt(t_new / t_old))
                    ctxs[a].getIntegrator().setTemperature(t_new * unit.kelvin)
                slot[i], slot[i + 1] = slot[i + 1], slot[i]
                energies[i], energies[i + 1] = energies[i + 1], energies[i]
        if cycle >= equilibration_swaps and (cycle - equilibration_swaps + 1) % swaps_per_frame == 0:
            for i in range(n):
                st = ctxs[slot[i]].getState(getPositions=True)
                pos[i, frame] = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                red[i, frame] = energies[i] / kts[i]
            frame += 1
        if bar is not None:
            bar.update(1)
            if n > 1:
                bar.set_postfix(swap_acc=f"{n_acc.sum() / max(n_att.sum(), 1):.2f}")
    if bar is not None:
        bar.close()
    return ReplicaExchangeResult(temps, pos, red, n_acc / np.maximum(n_att, 1))


def langevin_md(system, positions, temperature: float, n_frames: int, *, steps_per_frame: int = 250,
                equilibration_steps: int = 10000, timestep_fs: float = 1.0, friction: float = 1.0,
                seed: int = 0, platform: str = "Reference", progress: bool = True) -> np.ndarray:
    """Plain Langevin MD at one temperature (K); returns frames (n_frames, N, 3) in nm."""
    res = replica_exchange(system, positions, [temperature], n_frames, steps_per_swap=steps_per_frame,
                           equilibration_swaps=max(0, equilibration_steps // max(steps_per_frame, 1)),
                           timestep_fs=timestep_fs, friction=friction, seed=seed, platform=platform,
                           progress=progress)
    return res.positions[0]
