"""Samplers built on one generalized-work Metropolis core."""
from .hybrid import HybridResult, run_hybrid
from .metropolis import MetropolisResult, log_weights, metropolis_accept, run_metropolis
from .population import FlowPerturbationSMC, LatentMC, SMCResult, latent_sweep, sigmoid_schedule

__all__ = ["HybridResult", "run_hybrid", "MetropolisResult", "log_weights", "metropolis_accept", "run_metropolis",
           "LatentMC", "FlowPerturbationSMC", "SMCResult", "latent_sweep", "sigmoid_schedule"]
