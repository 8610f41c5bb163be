"""Fixed invertible coordinate transforms y -> x with exact log |det J|, and their registry.

A transform sits between the CNF output y and the physical coordinates x. The estimators apply
flow perturbation to the CNF only and add the transform's exact log-determinant.

The interface (:class:`FixedTransform`) every transform provides:

- TorchScript part: ``forward(y) -> (x, logdet)`` and ``inverse(x) -> (y, logdet)`` (exported),
  where ``logdet`` is always log |det dx/dy| at that point (shape (B,)), on the subspace the flow
  lives in; its parameters are buffers (``state_dict()``), float64.
- Python part (not compiled into flow files): the registry key ``name`` (also the
  ``train_flow(coordinates=...)`` value that selects it), ``config()`` (JSON-able arguments that,
  with the buffers, rebuild it: :meth:`FixedTransform.from_state`), ``from_samples`` (fit it to
  training data) and ``flow_layout`` (what a :class:`~openmm_flowpert.PerturbedFlow` records about
  it: coordinates kind, position dimension, whether positions are mean-free, orientation) and
  ``periodic`` (which CNF coordinates are angles of period 2 pi: the CNF in front of the
  transform then treats them as points on the circle).

A new transform subclasses :class:`FixedTransform`, is decorated with :func:`register_transform`,
and is then built, trained, saved and re-compiled like the others.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Type

import torch
from torch import nn

__all__ = ["FixedTransform", "Affine", "TRANSFORMS", "register_transform", "get_transform",
           "transform_from_state", "identity_transform"]

#: Registered transforms by name (see :func:`register_transform`).
TRANSFORMS: Dict[str, Type["FixedTransform"]] = {}


def register_transform(cls: Type["FixedTransform"]) -> Type["FixedTransform"]:
    """Class decorator: make a transform available under ``cls.name`` (flow files, training)."""
    if not cls.name or cls.name in TRANSFORMS:
        raise ValueError(f"transform name {cls.name!r} is empty or already registered")
    TRANSFORMS[cls.name] = cls
    return cls


def get_transform(name: str) -> Type["FixedTransform"]:
    """The transform class registered as ``name``."""
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform / coordinates {name!r}; choose from {sorted(TRANSFORMS)}") from None


def transform_from_state(spec: Dict[str, Any], state: Dict[str, torch.Tensor]) -> "FixedTransform":
    """Rebuild a transform from its spec ``{"name": ..., "config": {...}}`` and its buffers."""
    return get_transform(spec["name"]).from_state(dict(spec.get("config") or {}), state)


class FixedTransform(nn.Module):
    """Interface of the fixed transforms (see the module docstring); subclasses implement it.

    Class attributes: ``name`` (registry key), ``molecular`` (needs molecular samples
    (n, N >= 3, 3) and a topology to be fitted; positions are mean-free).
    """

    name = ""
    molecular = False

    # -- Python-only part (never compiled) ----------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments that, with ``state_dict()``, rebuild the transform."""
        raise NotImplementedError

    def spec(self) -> Dict[str, Any]:
        """``{"name", "config"}``: what a flow file records to rebuild this transform."""
        return {"name": self.name, "config": self.config()}

    @classmethod
    def from_state(cls, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> "FixedTransform":
        """The transform with ``config`` and the buffers ``state`` (bit-identical to the saved one)."""
        raise NotImplementedError

    @classmethod
    def from_samples(cls, x: torch.Tensor, n_atoms: int, mean_free: bool, topology=None) -> "FixedTransform":
        """Fit to training data x (n, 3N or d), float64 (already mean-free when ``mean_free``)."""
        raise NotImplementedError

    def flow_layout(self, cnf_dim: int, n_particles: int) -> Dict[str, Any]:
        """Check that the transform fits a CNF of ``cnf_dim`` coordinates (mean-free over
        ``n_particles`` when > 0) and return what the flow records about it: ``coordinates``,
        ``x_dim``, ``mean_free`` (positions mean-free whatever the CNF) and optionally ``n_atoms``
        and the orientation entries ``orientation`` (``"haar"``: proposals get a random
        orientation), ``frame``, ``zmatrix``."""
        raise NotImplementedError

    def cnf_particles(self) -> int:
        """Particles over which the CNF in front of this transform is mean-free (0: plain)."""
        raise NotImplementedError

    def periodic(self) -> List[int]:
        """Indices of the CNF coordinates that are angles (rad, period 2 pi); the transform must
        then be 2 pi-periodic in them, log-det included. Default: none."""
        return []

    def torsions(self) -> List[int]:
        """Indices of the CNF coordinates that are torsions of a molecule (on the line or on the
        circle). Default: none."""
        return []


@register_transform
class Affine(FixedTransform):
    """x = shift + scale * y (elementwise), a data-scale normalization.

    For a mean-free flow (``n_particles > 0``) ``scale`` must be one number and ``shift`` mean-free,
    so that the mean-free subspace maps onto itself; log |det| is then d * log(scale) with
    d = 3N - 3. Otherwise ``scale`` may be per coordinate and log |det| = sum log scale.
    Registered as ``"cartesian"``.
    """

    name = "cartesian"

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
        self.n_particles = int(n_particles)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.register_buffer("logdet_const", logdet.reshape(1))

    def forward(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.shift + self.scale * y
        return x, self.logdet_const.expand(y.shape[0])

    def inverse(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = (x - self.shift) / self.scale
        return y, self.logdet_const.expand(x.shape[0])

    # -- interface ---------------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        return {"n_particles": self.n_particles}

    @classmethod
    def from_state(cls, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> "Affine":
        t = cls(state["shift"], state["scale"], n_particles=int(config.get("n_particles", 0)))
        t.load_state_dict(state)
        return t

    @classmethod
    def from_samples(cls, x: torch.Tensor, n_atoms: int, mean_free: bool, topology=None) -> "Affine":
        """The mean structure and the spread *around* it -- one number (RMS) for a mean-free flow,
        one per coordinate otherwise -- so the normalized data have unit scale like the prior and
        the flow is not needlessly stiff. ``topology`` is not used."""
        shift = x.mean(0)
        dev = x - shift
        scale = dev.pow(2).mean().sqrt().clamp_min(1e-6).reshape(1) if mean_free else dev.std(0).clamp_min(1e-6)
        return cls(shift, scale, n_particles=n_atoms if mean_free else 0)

    def flow_layout(self, cnf_dim: int, n_particles: int) -> Dict[str, Any]:
        return {"coordinates": "cartesian", "x_dim": cnf_dim, "mean_free": False}

    def cnf_particles(self) -> int:
        return self.n_particles


def identity_transform(dim: int, n_particles: int = 0) -> Affine:
    """x = y: the transform of a flow built without one."""
    return Affine(torch.zeros(dim), torch.ones(1), n_particles=n_particles)

