"""Data preparation for flow matching: positions -> the flow's training coordinates.

Checks the sample array, removes the centre of mass where the flow is mean-free, fits the flow's
fixed transform (any registered :class:`~openmm_flowpert.flow.FixedTransform`: normalized
internal coordinates for molecules with a topology, scaled Cartesians otherwise), maps the samples
through its inverse, and splits them into training and validation sets.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..flow import FixedTransform, get_transform
from ..noise import project_mean_free

__all__ = ["TrainingData", "prepare_data", "as_samples", "split", "temperature_features", "repeat_to_share"]


@dataclass
class TrainingData:
    """Samples in the flow's coordinates, ready for training.

    Attributes
    ----------
    x : Tensor (n, 3N or d), float64
        The samples as given (mean-free when ``remove_com``), flattened.
    n_atoms : int
        Atoms of molecular samples (0 for (n, d) arrays).
    remove_com : bool
        The positions are mean-free.
    transform : FixedTransform
        The fitted fixed transform y -> x.
    n_particles : int
        Particles over which the CNF is mean-free (0: plain).
    y_train, y_val : Tensor, float32
        Training and validation samples in the CNF's coordinates (on the training device).
    c_train, c_val : Tensor (n, n_cond), float32, optional
        Conditioning features of those samples (log(T / T0) of a temperature-conditioned flow).
    """

    x: torch.Tensor
    n_atoms: int
    remove_com: bool
    transform: FixedTransform
    n_particles: int
    y_train: torch.Tensor
    y_val: torch.Tensor
    c_train: Optional[torch.Tensor] = None
    c_val: Optional[torch.Tensor] = None

    @property
    def dim(self) -> int:
        """Coordinates D of the CNF."""
        return int(self.y_train.shape[1])

    @property
    def n_cond(self) -> int:
        """Conditioning features per sample (0: an unconditioned flow)."""
        return 0 if self.c_train is None else int(self.c_train.shape[1])

    @property
    def periodic(self) -> List[int]:
        """CNF coordinates that are angles on the circle (the transform's; none without one)."""
        return [] if self.transform is None else list(self.transform.periodic())

    @property
    def torsions(self) -> List[int]:
        """CNF coordinates that are torsions (the transform's; none without one)."""
        return [] if self.transform is None else list(self.transform.torsions())


def as_samples(samples, remove_com: Optional[bool]):
    """Checked float64 samples flattened to (n, 3N or d), their atom count and the mean-free choice."""
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    if x.dim() == 3:
        if x.shape[-1] != 3:
            raise ValueError(f"molecular samples must have shape (n_samples, n_atoms, 3) in nm; got {tuple(x.shape)}")
        n_atoms = x.shape[1]
        remove_com = True if remove_com is None else bool(remove_com)
        if remove_com and n_atoms < 2:
            raise ValueError("remove_com=True needs at least 2 atoms; use remove_com=False")
        x = x.reshape(x.shape[0], -1)
    elif x.dim() == 2:
        n_atoms = 0
        if remove_com:
            raise ValueError("remove_com=True needs molecular samples of shape (n_samples, n_atoms, 3)")
        remove_com = False
    else:
        raise ValueError(f"samples must be (n_samples, n_atoms, 3) or (n_samples, d); got {tuple(x.shape)}")
    if x.shape[0] < 10:
        raise ValueError(f"need at least 10 samples to train a flow, got {x.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("samples contain NaN or infinite coordinates")
    return x, n_atoms, remove_com


def split(y: torch.Tensor, validation_fraction: float, generator: torch.Generator, device: torch.device,
          c: Optional[torch.Tensor] = None):
    """(training, validation) rows of y in a seeded random order, moved to ``device``; with ``c``
    (rows of y's conditions), (y_train, y_val, c_train, c_val) split alike."""
    perm = torch.randperm(y.shape[0], generator=generator)
    n_val = max(1, int(round(validation_fraction * y.shape[0]))) if validation_fraction > 0 else 0
    if c is None:
        return y[perm[n_val:]].to(device), y[perm[:n_val]].to(device)
    return (y[perm[n_val:]].to(device), y[perm[:n_val]].to(device), c[perm[n_val:]].to(device),
            c[perm[:n_val]].to(device))


def temperature_features(temperatures, reference: float, n: int) -> torch.Tensor:
    """log(T / T0) of per-sample temperatures (K), shape (n, 1) float32, checked."""
    t = torch.as_tensor(np.asarray(temperatures, dtype=np.float64)).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"temperatures must give one temperature (K) per sample: {t.numel()} for {n} samples")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()) or not reference > 0:
        raise ValueError("temperatures must be positive numbers of kelvin (and the reference temperature too)")
    return torch.log(t / float(reference)).float().reshape(n, 1)


#: More extra copies of each region frame than this draw a warning (31 of 1,311 frames overfitted).
MAX_COPIES = 10


def repeat_to_share(samples: np.ndarray, in_region: np.ndarray, share: float,
                    temperatures: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray], dict]:
    """Repeat the frames of a rare region until they make up ``share`` of the training set.

    Flow matching learns the mix of its data: a state that the data hold at a tenth of its Boltzmann
    weight gets a tenth of the proposals, and one they hold at nine times its weight costs the rest
    of the map (docs/algorithm.md 17.5). With frames of the state from replica exchange or a biased
    run, repeating them to about the state's Boltzmann share covers it. The Metropolis test and the
    importance weights use the flow's own density, so any share stays exact; it only moves the ESS.
    Frames are only added, never dropped: a region that already has ``share`` is left as it is. Many
    copies of few frames teach the flow those frames: on alanine tetrapeptide, 31 more copies of
    1,311 frames made held-out frames of the state 27 nats less likely than no repeats did; 10 more
    copies of 4,154 frames (a 3x longer replica-exchange run) showed no such loss. More than
    ``MAX_COPIES`` copies warn.

    Parameters
    ----------
    samples : array (n, ...)
        The frames (positions in nm, any trailing shape).
    in_region : bool array (n,)
        Which frames lie in the region.
    share : float
        The wanted fraction of the frames in the region, 0 < share < 1.
    temperatures : array (n,), optional
        Each frame's temperature (K), repeated with its frame.

    Returns
    -------
    samples, temperatures, info
        The frames with every region frame appended ``copies`` more times (each copy keeps its
        temperature), and ``info``: ``frames`` and ``region_frames`` before, ``copies``, and the
        ``share`` reached (the nearest to the one asked for that whole copies give).

    Examples
    --------
    >>> x, _, info = repeat_to_share(np.zeros((1000, 22, 3)), np.arange(1000) < 2, 0.01)
    >>> info["copies"], len(x)
    (4, 1008)
    """
    x = np.asarray(samples)
    mask = np.asarray(in_region, dtype=bool).reshape(-1)
    if mask.shape[0] != x.shape[0]:
        raise ValueError(f"in_region has {mask.shape[0]} entries for {x.shape[0]} frames; give one per frame")
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    n, m = x.shape[0], int(mask.sum())
    if m == 0:
        raise ValueError("no frame lies in the region, so none can be repeated; add frames that visit it "
                         "(replica exchange, a biased run) or check the region")
    def reached(k: int) -> float:
        return m * (1 + k) / (n + k * m)

    k = max(0.0, (share * n - m) / (m * (1.0 - share)))   # the real-valued solution of reached(k) = share
    copies = min((math.floor(k), math.ceil(k)), key=lambda c: abs(reached(c) - share))
    if copies > MAX_COPIES:
        warnings.warn(f"repeat_to_share: {m} frames in the region repeated {copies} more times; the flow may learn "
                      f"those frames rather than the state (more than {MAX_COPIES} copies overfitted in "
                      f"docs/benchmarks.md's tetrapeptide runs): give more frames of the state or a smaller share",
                      stacklevel=2)
    x = np.concatenate([x] + [x[mask]] * copies, 0)
    if temperatures is not None:
        t = np.asarray(temperatures).reshape(-1)
        temperatures = np.concatenate([t] + [t[mask]] * copies, 0)
    info = dict(frames=n, region_frames=m, copies=copies, share=reached(copies))
    return x, temperatures, info


def prepare_data(samples, *, coordinates: str, topology=None, remove_com: Optional[bool] = None,
                 validation_fraction: float, generator: torch.Generator,
                 device: torch.device = torch.device("cpu"), conditions: Optional[torch.Tensor] = None) -> TrainingData:
    """Samples -> :class:`TrainingData` for the transform registered as ``coordinates``.

    The split draws from ``generator`` (the training continues on it). Transforms marked
    ``molecular`` need (n, N >= 3, 3) samples and work on mean-free positions. ``conditions``
    (n, n_cond): per-sample conditioning features, split with the samples.
    """
    kind = get_transform(coordinates)
    x, n_atoms, remove_com = as_samples(samples, True if kind.molecular else remove_com)
    if kind.molecular and n_atoms < 3:
        raise ValueError(f"{coordinates} coordinates need molecular samples (n_samples, n_atoms >= 3, 3)")
    if remove_com:
        x = project_mean_free(x, n_atoms)
    transform = kind.from_samples(x, n_atoms, bool(remove_com), topology=topology)
    y, _ = transform.inverse(x)
    keep = torch.isfinite(y).all(1)
    if int(keep.sum()) < 10:
        raise ValueError(f"fewer than 10 samples have valid {coordinates} coordinates (collinear atoms?)")
    if conditions is None:
        y_train, y_val = split(y[keep].float(), validation_fraction, generator, device)
        return TrainingData(x, n_atoms, bool(remove_com), transform, transform.cnf_particles(), y_train, y_val)
    parts = split(y[keep].float(), validation_fraction, generator, device, c=conditions[keep].float())
    return TrainingData(x, n_atoms, bool(remove_com), transform, transform.cnf_particles(), *parts)
