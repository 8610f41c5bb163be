"""openmm-flowpert: unbiased Boltzmann sampling with flow perturbation in OpenMM.

``import torch`` happens first on purpose: the openmm-torch plugin only loads when torch is
imported before openmm in a process.
"""
import torch  # noqa: F401  (must precede any openmm import)

from . import noise, testsystems  # noqa: E402
from .noise import Noise  # noqa: E402
from .perturbed_flow import FlowFileError, PerturbedFlow, Proposal  # noqa: E402
from .samplers import MetropolisResult, run_metropolis  # noqa: E402
from .training import train_flow  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Noise", "PerturbedFlow", "Proposal", "FlowFileError", "train_flow", "run_metropolis",
           "MetropolisResult", "noise", "testsystems"]
