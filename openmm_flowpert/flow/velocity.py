"""Velocity fields v(t, y) for continuous normalizing flows."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import nn


class VelocityMLP(nn.Module):
    """MLP velocity field with a Fourier time embedding.

    v(t, y) = MLP([y, t, sin(2^j pi t), cos(2^j pi t)]_{j < n_freq}); the time part of the first
    layer is a separate bias so that one time value is embedded once per batch.

    Parameters
    ----------
    dim : int
        Dimension D of y.
    hidden : int
        Width of the hidden layers.
    n_layers : int
        Number of hidden layers (>= 1).
    n_freq : int
        Number of Fourier frequencies of the time embedding.
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, n_freq: int = 4):
        super().__init__()
        if dim < 1 or hidden < 1 or n_layers < 1:
            raise ValueError("dim, hidden and n_layers must be positive")
        self.dim = dim
        self.width, self.n_layers, self.n_freq = int(hidden), int(n_layers), int(n_freq)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))
        self.inp = nn.Linear(dim, hidden)
        self.time_inp = nn.Linear(1 + 2 * n_freq, hidden, bias=False)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_layers - 1)])
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``t``: shape (1, 1) or (B, 1); ``y``: shape (B, D). Returns v with shape (B, D)."""
        tf = t * self.freqs
        feats = torch.cat([t, torch.sin(tf), torch.cos(tf)], dim=-1)
        h = self.act(self.inp(y) + self.time_inp(feats))
        for layer in self.hidden:
            h = self.act(layer(h))
        return self.out(h)

    # -- Python only: the sizes a flow file records (``metadata["velocity"]``) --------------------
    def config(self) -> Dict[str, Any]:
        """``{"kind", "dim", "hidden", "n_layers", "n_freq"}``: rebuilds it with :func:`velocity_from_state`."""
        return {"kind": "VelocityMLP", "dim": int(self.dim), "hidden": self.width, "n_layers": self.n_layers,
                "n_freq": self.n_freq}


def velocity_config(velocity: nn.Module) -> Optional[Dict[str, Any]]:
    """The recorded sizes of a velocity field (None when it is not a :class:`VelocityMLP`)."""
    return velocity.config() if isinstance(velocity, VelocityMLP) else None


def guess_velocity_config(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Sizes of a :class:`VelocityMLP` from its weights (flow files written before the sizes were
    recorded). Raises KeyError when the weights are not a VelocityMLP's."""
    hidden, dim = state["inp.weight"].shape
    n_hidden = len([k for k in state if k.startswith("hidden.") and k.endswith(".weight")])
    return {"kind": "VelocityMLP", "dim": int(dim), "hidden": int(hidden), "n_layers": n_hidden + 1,
            "n_freq": int(state["freqs"].numel())}


def velocity_from_state(config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> VelocityMLP:
    """A :class:`VelocityMLP` with the sizes ``config`` and the weights ``state``."""
    if config.get("kind") != "VelocityMLP":
        raise KeyError(f"velocity kind {config.get('kind')!r}")
    velocity = VelocityMLP(int(config["dim"]), hidden=int(config["hidden"]), n_layers=int(config["n_layers"]),
                           n_freq=int(config["n_freq"]))
    velocity.load_state_dict(state)
    return velocity
