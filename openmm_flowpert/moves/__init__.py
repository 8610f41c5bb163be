"""openmmtools MCMC moves that propose from a perturbed flow, and their seeded companions."""
from ..analysis import _pymbar_timeseries

_pymbar_timeseries()  # openmmtools imports pymbar: without its import banner and per-call caution

from .flow_move import FlowPerturbationMove, load_flow_cached  # noqa: E402
from .langevin import SeededLangevinDynamicsMove  # noqa: E402
from .replica_rng import seed_replica_exchange  # noqa: E402

__all__ = ["FlowPerturbationMove", "SeededLangevinDynamicsMove", "load_flow_cached", "seed_replica_exchange"]
