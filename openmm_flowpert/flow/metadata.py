"""The metadata of a flow file: one typed record with its defaults, and its JSON form.

A flow file stores this record as plain JSON (``flowpert.json`` next to the TorchScript code);
:attr:`PerturbedFlow.metadata <openmm_flowpert.PerturbedFlow.metadata>` is that JSON dict and
:meth:`FlowMetadata.from_json` reads it back, also from files written before a field existed
(the field then takes its default; where an old file implies a value, e.g. its transform, it is
derived here and nowhere else).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["FlowMetadata", "FORMAT", "FORMAT_VERSION"]

FORMAT = "openmm-flowpert-flow"
FORMAT_VERSION = 1

# written only when set (absent from the JSON of flows that do not have them)
_OPTIONAL = ("orientation", "frame", "zmatrix", "velocity", "transform", "noise_backend", "grid", "training",
             "periodic")


@dataclass
class FlowMetadata:
    """What a flow file records besides its weights and compiled code.

    Attributes
    ----------
    n_atoms : int
        Atoms of a molecular flow ((B, n_atoms, 3) positions, nm); 0 for an abstract target.
    remove_com : bool
        Positions are mean-free (centre of mass removed).
    latent_particles : int
        Particles over which the CNF (latent space) is mean-free; 0: plain.
    dim, d, x_dim : int
        Latent coordinates D, effective dimension d of the estimators, coordinates of x.
    prior_scale : float
        Standard deviation s of the latent prior N(0, s^2 I).
    integrator, n_steps, times, grid : str, int, list of float, str or None
        Explicit scheme, number of steps, the time grid and its kind ("quadratic", "uniform").
    temperature : float or None
        Temperature (K) of the training data.
    coordinates : str
        ``"cartesian"`` or ``"internal"`` (the transform's coordinates kind).
    orientation, frame, zmatrix : optional
        ``"haar"`` when proposals get a uniformly random orientation; the Z-matrix frame atoms
        (a0, a1, a2, a2_on_a0) and the Z-matrix of an internal-coordinate flow.
    inverse_memory : int
        Anderson depth of the compiled exact inverse.
    code : str
        Fingerprint of the flow/estimator source the file was compiled from.
    velocity : dict or None
        Sizes of the velocity network (``{"kind": "VelocityMLP", "dim", "hidden", "n_layers",
        "n_freq"}``); None in older files (re-compiling then reads them off the weights).
    transform : dict
        The fixed transform, ``{"name", "config"}`` (see :mod:`openmm_flowpert.flow.transforms`).
    noise_backend : str or None
        Noise backend (``"native"`` or ``"torch"``) active when the flow was built or trained;
        seeded results differ between backends. None: not recorded (older files).
    training : dict or None
        What :func:`~openmm_flowpert.train_flow` recorded (epochs, losses, sizes, ...).
    periodic : list of int or None
        Latent coordinates that are angles (uniform prior on the circle; z = 2 pi Phi(w) - pi
        from the standard-normal state w). None: none (a Gaussian prior on every coordinate).
    extra : dict
        Any other JSON entries (kept as they are).
    """

    n_atoms: int = 0
    remove_com: bool = False
    latent_particles: int = 0
    dim: int = 0
    d: int = 0
    x_dim: int = 0
    prior_scale: float = 1.0
    integrator: str = "rk4"
    n_steps: int = 0
    times: List[float] = field(default_factory=list)
    temperature: Optional[float] = None
    coordinates: str = "cartesian"
    inverse_memory: int = 0
    code: str = ""
    orientation: Optional[str] = None
    frame: Optional[List[Any]] = None
    zmatrix: Optional[List[List[int]]] = None
    velocity: Optional[Dict[str, Any]] = None
    transform: Optional[Dict[str, Any]] = None
    noise_backend: Optional[str] = None
    grid: Optional[str] = None
    training: Optional[Dict[str, Any]] = None
    periodic: Optional[List[int]] = None
    format: str = FORMAT
    version: int = FORMAT_VERSION
    units: str = "nm"
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        """The plain-JSON dict a flow file stores (``extra`` entries at the top level)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name in _OPTIONAL and value is None):
                continue
            out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, meta: Dict[str, Any]) -> "FlowMetadata":
        """The record of a metadata dict (unknown entries go to ``extra``; missing ones take their
        default, and an old file's transform is derived from its coordinates)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rec = cls(**{k: v for k, v in meta.items() if k in names},
                  extra={k: v for k, v in meta.items() if k not in names})
        if rec.transform is None:  # files written before the transform was recorded
            rec.transform = ({"name": "internal", "config": {"n_atoms": int(rec.n_atoms)}}
                             if rec.coordinates == "internal" else
                             {"name": "cartesian", "config": {"n_particles": int(rec.latent_particles)}})
        return rec
