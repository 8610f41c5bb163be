"""The training settings of a flow, their names and defaults in one place.

:func:`~openmm_flowpert.train_flow` takes these as keyword arguments and ``flowpert train`` as
options (``--n-layers`` for ``n_layers``, ...), both with the defaults below and the help text of
each field's metadata. The bundled alanine-dipeptide flow was trained with these except
``epochs=150, batch_size=512, minutes=30`` (its metadata holds the command; docs/benchmarks.md
section 6).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = ["TrainingConfig", "DEFAULTS"]


def _opt(default: Any, type: type, help: str, **kw) -> Any:
    return field(default=default, metadata=dict(type=type, help=help, **kw))


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of flow-matching training (see :func:`~openmm_flowpert.train_flow`)."""

    # the velocity network
    hidden: int = _opt(256, int, "width of the velocity MLP's hidden layers")
    n_layers: int = _opt(3, int, "hidden layers of the velocity MLP", aliases=("--layers",))
    n_freq: int = _opt(4, int, "Fourier frequencies of the velocity MLP's time embedding")
    linear: Optional[bool] = _opt(None, bool, "add a linear map of the coordinates, its matrix a function of time, "
                                              "to the velocity MLP (VelocityMLP's linear=True; default: on for "
                                              "molecules in internal coordinates, off for Cartesian flows and "
                                              "abstract targets)")
    linear_torsions: bool = _opt(False, bool, "the linear map includes the torsions of an internal-coordinate flow "
                                              "(default: bonds and angles only; with the torsions it loses rare "
                                              "conformational basins)")
    # the integrator of the trained flow
    n_steps: int = _opt(20, int, "integrator steps of the flow", aliases=("--steps",))
    grid: str = _opt("quadratic", str, "time grid: 'quadratic' (steps shrinking toward the data end) or 'uniform'",
                     choices=("quadratic", "uniform"))
    scheme: str = _opt("rk4", str, "integrator scheme", choices=("rk4", "midpoint", "euler"))
    # the schedule: Adam with cosine decay, EMA weights, held-out validation
    epochs: int = _opt(300, int, "training epochs (passes over the training data)")
    batch_size: int = _opt(256, int, "samples per optimizer step", aliases=("--batch",))
    lr: float = _opt(1e-3, float, "Adam learning rate (cosine decay to 0 over the epochs)")
    weight_decay: float = _opt(0.0, float, "Adam weight decay")
    ema: float = _opt(0.999, float, "decay of the exponential moving average of the weights (the flow uses the EMA)")
    validation_fraction: float = _opt(0.1, float, "fraction of the samples held out for the validation loss")
    patience: Optional[int] = _opt(None, int, "stop after this many epochs without a better validation loss "
                                         "(default: never)")
    minutes: Optional[float] = _opt(None, float, "wall-clock budget in minutes; training then stops, keeping the "
                                          "best weights (default: none)")
    likelihood_minutes: float = _opt(0.0, float, "maximum-likelihood fine-tuning after flow matching, in minutes of "
                                                 "wall time (0: none; plain CNFs: internal coordinates, abstract "
                                                 "targets)")
    likelihood_lr: float = _opt(2e-4, float, "Adam learning rate of the likelihood fine-tuning")
    prior_scale: float = _opt(1.0, float, "standard deviation of the latent prior")
    seed: int = _opt(0, int, "seeds the split, the initialization and the noise: equal seeds, equal flows")

    def __post_init__(self):
        for name in ("hidden", "n_layers", "n_steps", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema <= 1.0:
            raise ValueError(f"ema must be in [0, 1], got {self.ema}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.likelihood_minutes < 0:
            raise ValueError(f"likelihood_minutes must be >= 0, got {self.likelihood_minutes}")
        if not self.prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {self.prior_scale}")

    @classmethod
    def help(cls) -> Dict[str, Dict[str, Any]]:
        """Per field: ``default``, ``type``, ``help`` and optional ``choices`` / ``aliases`` (for the CLI)."""
        return {f.name: dict(f.metadata, default=f.default) for f in dataclasses.fields(cls)}


#: The defaults (``DEFAULTS.lr`` ...), used by train_flow's signature and by ``flowpert train``.
DEFAULTS = TrainingConfig()
