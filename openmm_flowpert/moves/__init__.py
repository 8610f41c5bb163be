"""openmmtools MCMC moves that propose from a perturbed flow."""
from .flow_move import FlowPerturbationMove, load_flow_cached
from .replica_rng import seed_replica_exchange

__all__ = ["FlowPerturbationMove", "load_flow_cached", "seed_replica_exchange"]
