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
from ..metropolis import systematic_resample
from ..noise import project_mean_free

__all__ = ["TrainingData", "prepare_data", "as_samples", "split", "temperature_features", "repeat_to_share",
           "ladder_log_weights", "reweight_ladder"]


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


def ladder_log_weights(reduced_energies: np.ndarray, temperatures: np.ndarray, temperature: float,
                       tolerance: float = 1e-9, max_iterations: int = 10000) -> np.ndarray:
    """Normalized log weights (nats) at ``temperature`` of frames pooled from a temperature ladder (MBAR).

    Frames drawn at several temperatures T_k of one potential (the replicas of a replica-exchange run)
    estimate averages at any T by the multistate Bennett acceptance ratio: the weight of frame n is
    exp(-u_n) / sum_k N_k exp(f_k - u_n T/T_k), u_n its reduced energy at T, f_k the reduced free energy
    of T_k, solved self-consistently (docs/algorithm.md 17.6).

    Parameters
    ----------
    reduced_energies : array (n,)
        Each frame's reduced potential U / kT at ``temperature`` (kT; finite).
    temperatures : array (n,)
        The temperature (K) each frame was sampled at; the distinct values make the ladder.
    temperature : float
        The temperature (K) to reweight to; it need not be on the ladder.

    Returns
    -------
    log_w : array (n,)
        log weights with logsumexp(log_w) = 0.

    Examples
    --------
    >>> u = np.array([1.0, 2.0, 1.5, 3.0])
    >>> w = np.exp(ladder_log_weights(u, np.array([300.0, 300.0, 400.0, 400.0]), 300.0))
    >>> bool(abs(w.sum() - 1) < 1e-12 and w[0] > w[1])
    True
    """
    u = np.asarray(reduced_energies, dtype=np.float64).reshape(-1)
    t = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if u.shape != t.shape:
        raise ValueError(f"{u.shape[0]} reduced energies for {t.shape[0]} temperatures; give one of each per frame")
    if not np.all(np.isfinite(u)):
        raise ValueError(f"{int(np.sum(~np.isfinite(u)))} frame(s) have a non-finite energy; remove them first")
    if not (np.all(t > 0) and temperature > 0):
        raise ValueError("temperatures must be positive numbers of kelvin")
    ladder, which = np.unique(t, return_inverse=True)
    log_n = np.log(np.bincount(which))
    u_k = u[:, None] * (float(temperature) / ladder[None, :])      # (n, K): each frame's u at each T_k
    f = np.zeros(len(ladder))
    for _ in range(max_iterations):
        log_den = np.logaddexp.reduce(log_n[None, :] + f[None, :] - u_k, axis=1)
        f_new = -np.logaddexp.reduce(-u_k - log_den[:, None], axis=0)
        f_new -= f_new[0]
        converged = np.max(np.abs(f_new - f)) < tolerance
        f = f_new
        if converged:
            break
    log_w = -u - log_den
    return log_w - np.logaddexp.reduce(log_w)


def reweight_ladder(samples: np.ndarray, temperatures: np.ndarray, reduced_energies: np.ndarray,
                    temperature: float, n_frames: Optional[int] = None, seed: int = 0) -> Tuple[np.ndarray, dict]:
    """Frames of a temperature ladder resampled to the Boltzmann distribution at ``temperature``.

    Flow matching learns the mix of its data, so training a flow for 300 K on frames from hotter
    replicas as they are makes its proposals hot (alanine tetrapeptide: 8 kT above the data's median
    energy). Weighting each frame by :func:`ladder_log_weights` and drawing ``n_frames`` by systematic
    resampling gives a set at ``temperature`` in which the neighbouring replicas add distinct frames
    (a 300-600 K ladder of 8 replicas: about twice the effective frames of the 300 K replica alone).

    Parameters
    ----------
    samples : array (n, ...)
        The frames (positions in nm, any trailing shape).
    temperatures : array (n,)
        The temperature (K) each frame was sampled at.
    reduced_energies : array (n,)
        Each frame's U / kT at ``temperature`` (kT).
    temperature : float
        The target temperature (K).
    n_frames : int, optional
        How many frames to draw (default: n).
    seed : int
        Seed of the resampling's one uniform offset.

    Returns
    -------
    frames, info
        ``n_frames`` frames (repeats where a weight is large), and ``info``: ``frames`` (n),
        ``distinct`` (how many different frames were drawn), ``kish_frames`` (the weights' Kish
        effective sample size) and ``share`` (the total weight of each ladder temperature, K -> fraction).

    Examples
    --------
    >>> x = np.arange(4.0).reshape(4, 1, 1)
    >>> y, info = reweight_ladder(x, np.array([300.0, 300.0, 600.0, 600.0]), np.zeros(4), 300.0)
    >>> y.shape, info["distinct"]
    ((4, 1, 1), 4)
    """
    x = np.asarray(samples)
    t = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if x.shape[0] != t.shape[0]:
        raise ValueError(f"{t.shape[0]} temperatures for {x.shape[0]} frames; give one per frame")
    n_frames = x.shape[0] if n_frames is None else int(n_frames)
    if n_frames < 1:
        raise ValueError(f"n_frames must be a positive count, got {n_frames}")
    w = np.exp(ladder_log_weights(reduced_energies, t, temperature))
    uniform = torch.tensor([np.random.default_rng(seed).random()])
    pick = systematic_resample(torch.from_numpy(w), uniform, n_frames).numpy()
    share = {float(k): float(w[t == k].sum()) for k in np.unique(t)}
    info = dict(frames=int(x.shape[0]), distinct=int(len(np.unique(pick))), kish_frames=float(1.0 / np.sum(w ** 2)),
                share=share)
    return x[pick], info


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
