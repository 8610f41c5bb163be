"""A seeded openmmtools Langevin move, so that hybrid MD / flow MC runs are reproducible."""
from __future__ import annotations

import zlib

import numpy as np
from openmm import unit
from openmmtools import mcmc

__all__ = ["SeededLangevinDynamicsMove"]


class SeededLangevinDynamicsMove(mcmc.LangevinDynamicsMove):
    """``openmmtools.mcmc.LangevinDynamicsMove`` whose integrator noise is seeded.

    With ``reassign_velocities=True`` the Maxwell-Boltzmann velocities drawn before each segment are
    seeded too: from ``seed`` and a checksum of the positions and temperature they are drawn for (openmmtools would
    draw them with an OpenMM-chosen seed, so a run could not be repeated or resumed bit for bit).

    Parameters
    ----------
    seed : int
        Seed of the Langevin integrator's random numbers (OpenMM's 0 = "pick one" is avoided).
    **kwargs
        Passed to ``LangevinDynamicsMove`` (timestep, collision_rate, n_steps, ...).
    """

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = int(seed)

    def _get_integrator(self, thermodynamic_state):
        integrator = super()._get_integrator(thermodynamic_state)
        integrator.setRandomNumberSeed(self.seed % 2_147_483_647 + 1)
        return integrator

    def _before_integration(self, context, thermodynamic_state):
        super()._before_integration(context, thermodynamic_state)
        if self.reassign_velocities:  # replace openmmtools' unseeded draw by a seeded one
            x = context.getState(getPositions=True).getPositions(asNumpy=True)._value
            temperature = thermodynamic_state.temperature.value_in_unit(unit.kelvin)
            data = np.append(np.ascontiguousarray(x, dtype=np.float64).ravel(), temperature).tobytes()
            key = zlib.crc32(data, self.seed % 2**32)  # replicas that share positions differ in T
            context.setVelocitiesToTemperature(thermodynamic_state.temperature, key % 2_147_483_646 + 1)

    def __getstate__(self):
        state = super().__getstate__()
        state["seed"] = self.seed
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.seed = int(state.get("seed", 0))
