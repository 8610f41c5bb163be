"""Samplers built on the Metropolis core: batches of chains, latent MC, SMC, hybrid MD / flow MC."""
from .hybrid import HybridResult, run_hybrid
from .metropolis import MetropolisResult, log_weights, metropolis_accept, run_metropolis
from .population import FlowPerturbationSMC, LatentMC, SMCResult, sigmoid_schedule

__all__ = ["HybridResult", "run_hybrid", "MetropolisResult", "log_weights", "metropolis_accept", "run_metropolis",
           "LatentMC", "FlowPerturbationSMC", "SMCResult", "sigmoid_schedule"]
