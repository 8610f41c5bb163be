"""Fixed invertible coordinate transforms y -> x with exact log |det J|.

A transform sits between the CNF output y and the physical coordinates x. The estimators apply
flow perturbation to the CNF only and add the transform's exact log-determinant. Every transform
provides ``forward(y) -> (x, logdet)`` and ``inverse(x) -> (y, logdet)``, where ``logdet`` is
always log |det dx/dy| at that point (shape (B,)), on the subspace the flow lives in.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class Affine(nn.Module):
    """x = shift + scale * y (elementwise), a data-scale normalization.

    For a mean-free flow (``n_particles > 0``) ``scale`` must be one number and ``shift`` mean-free,
    so that the mean-free subspace maps onto itself; log |det| is then d * log(scale) with
    d = 3N - 3. Otherwise ``scale`` may be per coordinate and log |det| = sum log scale.
    """

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, n_particles: int = 0):
        super().__init__()
        shift = torch.as_tensor(shift, dtype=torch.float64).flatten()
        scale = torch.as_tensor(scale, dtype=torch.float64).flatten()
        if (scale <= 0).any():
            raise ValueError("scale must be positive")
        d = shift.numel()
        if n_particles > 0:
            if scale.numel() != 1:
                raise ValueError("a mean-free flow needs a single (isotropic) scale")
            shift = (shift.view(n_particles, 3) - shift.view(n_particles, 3).mean(0)).flatten()
            d = d - 3
            logdet = d * torch.log(scale[0])
        else:
            if scale.numel() == 1:
                scale = scale.expand(d).clone()
            if scale.numel() != d:
                raise ValueError(f"scale has {scale.numel()} entries for {d} coordinates")
            logdet = torch.log(scale).sum()
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.register_buffer("logdet_const", logdet.reshape(1))

    def forward(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.shift + self.scale * y
        return x, self.logdet_const.expand(y.shape[0])

    def inverse(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = (x - self.shift) / self.scale
        return y, self.logdet_const.expand(x.shape[0])
