"""Pure-torch noise with the semantics of the native ops (keyed by seed, stream, offset).

Each call seeds a private ``torch.Generator`` from a 64-bit mix of the key, so draws are
reproducible and independent of the global torch RNG and of thread counts. The numbers differ
from the native Philox streams; the distributions are the same. Draws are made on the CPU and
copied to the requested device, so they are the same numbers on every device.
"""
from __future__ import annotations

from typing import Optional

import torch

_MASK = (1 << 64) - 1


def _mix(seed: int, stream: int, offset: int) -> int:
    """SplitMix64-style mixing of the key into one generator seed (< 2**63)."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + offset * 0x94D049BB133111EB) & _MASK
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def generator(seed: int, stream: int, offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, stream, offset))


def _to(x: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    return x if device is None or device.type == "cpu" else x.to(device)


def gaussian(rows: int, dim: int, n_particles: int, seed: int, stream: int, offset: int,
             device: Optional[torch.device] = None) -> torch.Tensor:
    g = torch.randn(rows, dim, generator=generator(seed, stream, offset), dtype=torch.float64)
    if n_particles > 0:
        y = g.view(rows, n_particles, 3)
        g = (y - y.mean(dim=1, keepdim=True)).view(rows, dim)
    return _to(g, device)


def uniform(n: int, seed: int, stream: int, offset: int, device: Optional[torch.device] = None) -> torch.Tensor:
    u = torch.rand(n, generator=generator(seed, stream, offset), dtype=torch.float64)
    return _to(u.clamp_min(torch.finfo(torch.float64).tiny), device)


def partial_redraw(w: torch.Tensor, k: torch.Tensor, seed: int, stream: int, offset: int) -> torch.Tensor:
    """Sort-based reference: a random permutation per row, the first k[i] positions are redrawn.

    Computed on the CPU; the result is on ``w``'s device."""
    B, D = w.shape
    gen = generator(seed, stream, offset)
    keys = torch.rand(B, D, generator=gen, dtype=torch.float64)
    ranks = torch.argsort(torch.argsort(keys, dim=1), dim=1)
    mask = ranks < k.cpu().view(B, 1)
    fresh = torch.randn(B, D, generator=gen, dtype=torch.float64)
    return _to(torch.where(mask, fresh, w.cpu().to(torch.float64)), w.device)
