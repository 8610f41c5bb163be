"""Plain Langevin MD in OpenMM, for training data and reference runs at one temperature.

Temperature replica exchange lives in :mod:`openmm_flowpert.samplers.replica_exchange` (on
openmmtools). Positions are in nm, temperatures in K, times in fs / ps as named.
"""
from __future__ import annotations

import numpy as np
import openmm
from openmm import unit

__all__ = ["langevin_md"]


def langevin_md(system, positions, temperature: float, n_frames: int, *, steps_per_frame: int = 250,
                equilibration_steps: int = 10000, timestep_fs: float = 1.0, friction: float = 1.0,
                seed: int = 0, platform: str = "Reference", progress: bool = True) -> np.ndarray:
    """Langevin MD at ``temperature`` (K); returns frames (n_frames, N, 3) in nm.

    ``positions`` (N, 3) nm (or a Quantity) start the run; ``equilibration_steps`` (rounded down to
    whole frames of ``steps_per_frame`` steps) are discarded. The integrator and the initial
    velocities are seeded by ``seed``.
    """
    rng = np.random.default_rng(seed)
    x0 = np.asarray(positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(int(seed * 1000 + 1))
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform),
                             {"Threads": "1"} if platform == "CPU" else {})
    context.setPositions(x0)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, int(rng.integers(1 << 30)))
    n_eq = max(0, equilibration_steps // max(steps_per_frame, 1))
    frames = np.zeros((n_frames,) + x0.shape)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_eq + n_frames, desc="MD", unit="frame")
    for cycle in range(n_eq + n_frames):
        integrator.step(steps_per_frame)
        if cycle >= n_eq:
            frames[cycle - n_eq] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(
                unit.nanometer)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return frames
