"""Samplers built on one generalized-work Metropolis core."""
from .hybrid import HybridResult, run_hybrid
from .metropolis import MetropolisResult, log_weights, metropolis_accept, run_metropolis

__all__ = ["HybridResult", "run_hybrid", "MetropolisResult", "log_weights", "metropolis_accept", "run_metropolis"]
