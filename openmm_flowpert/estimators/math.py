"""Small TorchScript-compatible pieces of maths shared by every estimator."""
from __future__ import annotations

import math
from typing import Tuple

import torch


def log_prior(z: torch.Tensor, scale: float, d: int) -> torch.Tensor:
    """log N(z; 0, scale^2 I_d) per row, for z in a d-dimensional (sub)space. Shape (B,)."""
    return -0.5 * (z * z).sum(dim=1) / (scale * scale) - 0.5 * d * math.log(2.0 * math.pi * scale * scale)


def log_norm(v: torch.Tensor) -> torch.Tensor:
    """log ||v||_2 over the last axis."""
    return torch.log(torch.linalg.vector_norm(v, dim=-1))


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| over the last axis."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def split_pm(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a batch stacked as [plus; minus] into its two halves."""
    n = v.shape[0] // 2
    return v[:n], v[n:]
