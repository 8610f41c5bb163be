"""A seeded openmmtools Langevin move, so that hybrid MD / flow MC runs are reproducible."""
from __future__ import annotations

from openmmtools import mcmc

__all__ = ["SeededLangevinDynamicsMove"]


class SeededLangevinDynamicsMove(mcmc.LangevinDynamicsMove):
    """``openmmtools.mcmc.LangevinDynamicsMove`` whose integrator noise is seeded.

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

    def __getstate__(self):
        state = super().__getstate__()
        state["seed"] = self.seed
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.seed = int(state.get("seed", 0))
