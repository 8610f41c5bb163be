"""Small TorchScript-compatible pieces of maths shared by every estimator."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def log_prior(z: torch.Tensor, scale: float, d: int, periodic: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p_Z(z) per row (B,) for z (B, D) in a d-dimensional (sub)space: N(0, scale^2 I_d), or,
    with a boolean mask ``periodic`` (D,) of m angle coordinates, N(0, scale^2 I_(d - m)) on the
    others times the uniform density 1 / (2 pi)^m on the torus (the same on every branch)."""
    if periodic is None:
        return -0.5 * (z * z).sum(dim=1) / (scale * scale) - 0.5 * d * math.log(2.0 * math.pi * scale * scale)
    m = int(periodic.sum())
    plain = torch.where(periodic, torch.zeros_like(z), z)
    return (-0.5 * (plain * plain).sum(dim=1) / (scale * scale)
            - 0.5 * (d - m) * math.log(2.0 * math.pi * scale * scale) - m * math.log(2.0 * math.pi))


def wrap_angle(a: torch.Tensor) -> torch.Tensor:
    """Angles a (rad, any shape) wrapped into [-pi, pi)."""
    return torch.remainder(a + math.pi, 2.0 * math.pi) - math.pi


def angle_from_normal(w: torch.Tensor) -> torch.Tensor:
    """2 pi Phi(w) - pi: standard-normal w (any shape) -> angles uniform on [-pi, pi) (rad)."""
    return 2.0 * math.pi * torch.special.ndtr(w) - math.pi


def wrap_angles(z: torch.Tensor, periodic: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z (B, D) with the coordinates of the boolean mask ``periodic`` (D,) wrapped into [-pi, pi)."""
    if periodic is None:
        return z
    return torch.where(periodic, wrap_angle(z), z)


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
