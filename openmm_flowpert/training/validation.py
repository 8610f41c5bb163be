"""Validation of a trained molecular flow by the reduced energies of its proposals.

A flow whose proposals sit far above the training data in energy is not going to be accepted;
the median reduced energy of ``n`` proposals against that of ``n`` training frames says so before
any sampling run.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np
import torch

from ..perturbed_flow import PerturbedFlow
from .data import TrainingData

__all__ = ["energy_validation", "median_energy"]


def median_energy(flow: PerturbedFlow, energy: Callable, n: int, seed: int) -> float:
    """Median reduced energy (kT) of ``n`` samples of the flow (non-finite energies count as +inf)."""
    u = np.asarray(energy(flow.sample(n, seed=seed)), dtype=np.float64)
    return float(np.median(np.where(np.isfinite(u), u, np.inf)))


def energy_validation(flow: PerturbedFlow, data: TrainingData, energy: Callable, n: int,
                      generator: torch.Generator, seed: int) -> Dict[str, float]:
    """``data_median_energy`` of ``n`` training samples picked with ``generator`` and
    ``proposal_median_energy`` of ``n`` flow samples drawn with ``seed``."""
    if data.n_atoms == 0:
        raise ValueError("energy validation is for molecular flows")
    pick = torch.randperm(data.x.shape[0], generator=generator)[:n]
    data_u = np.asarray(energy(data.x[pick].reshape(-1, data.n_atoms, 3)), dtype=np.float64)
    return {"data_median_energy": float(np.median(data_u)),
            "proposal_median_energy": median_energy(flow, energy, n, seed)}
