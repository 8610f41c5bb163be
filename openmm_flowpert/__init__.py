"""openmm-flowpert: unbiased Boltzmann sampling with flow perturbation in OpenMM.

``import torch`` happens first on purpose: the openmm-torch plugin only loads when torch is
imported before openmm in a process.

OpenMP threads of torch wait passively (``OMP_WAIT_POLICY=PASSIVE``) unless you set the variable
yourself before importing torch: flow moves alternate small torch calls with OpenMM, and busy-waiting
threads slow fp++ calls up to 150-fold when another process shares the cores (docs/benchmarks.md,
introduction). This takes effect only if openmm_flowpert is imported before torch.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402,F401  (must precede any openmm import)

from . import noise, testsystems  # noqa: E402
from .noise import Noise  # noqa: E402
from .perturbed_flow import FlowFileError, PerturbedFlow, Proposal  # noqa: E402
from .samplers import FlowPerturbationSMC, LatentMC, MetropolisResult, run_metropolis  # noqa: E402
from .training import refine_by_importance, train_flow  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # openmmtools (and the pymbar banners it prints) are imported only when the move is used.
    if name == "FlowPerturbationMove":
        from .moves import FlowPerturbationMove

        return FlowPerturbationMove
    raise AttributeError(f"module 'openmm_flowpert' has no attribute {name!r}")

__all__ = ["FlowPerturbationMove", "Noise", "PerturbedFlow", "Proposal", "FlowFileError", "train_flow",
           "refine_by_importance", "run_metropolis", "MetropolisResult", "LatentMC", "FlowPerturbationSMC", "noise",
           "testsystems"]
