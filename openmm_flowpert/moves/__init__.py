"""openmmtools MCMC moves that propose from a perturbed flow."""
from .flow_move import FlowPerturbationMove, load_flow_cached

__all__ = ["FlowPerturbationMove", "load_flow_cached"]
