"""Samplers built on one generalized-work Metropolis core."""
from .metropolis import MetropolisResult, log_weights, metropolis_accept, run_metropolis

__all__ = ["MetropolisResult", "log_weights", "metropolis_accept", "run_metropolis"]
