"""Conditional flow matching (optimal-transport path) for the CNF of a :class:`PerturbedFlow`.

:func:`train_flow` is the one call; it puts together the parts:

- :mod:`.config`: the hyperparameters (:class:`TrainingConfig`, the defaults of both ``train_flow``
  and ``flowpert train``);
- :mod:`.data`: samples -> the flow's training coordinates (fitted fixed transform, split);
- :mod:`.trainer`: :class:`FlowTrainer` (float32 Adam, cosine decay, EMA weights, checkpoints);
- :mod:`.validation`: proposal energies against the training data.

The exported flow uses the EMA weights of the best validation epoch in float64; with
``likelihood_minutes`` > 0 they are then fine-tuned by maximum likelihood (:mod:`.likelihood`).
Normalization (the flow's fixed transform): for molecules with a topology, internal coordinates
(:class:`~openmm_flowpert.flow.MarginalInternal`: bonds and angles scaled by their data spread,
torsions mapped to the line through their fitted marginals, orientation Haar-distributed,
d = 3N - 6); for molecules without one, mean-free
Cartesians scaled by their RMS spread around the mean structure (d = 3N - 3); for abstract
targets, per-coordinate standardization.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from ..flow import time_grid
from ..perturbed_flow import PerturbedFlow
from .config import DEFAULTS, TrainingConfig
from .data import prepare_data, temperature_features
from .likelihood import LikelihoodTrainer
from .trainer import FlowTrainer, load_checkpoint
from .validation import energy_validation

__all__ = ["train_flow"]

_D = DEFAULTS


def train_flow(samples, *, topology=None, coordinates: Optional[str] = None, remove_com: Optional[bool] = None,
               n_steps: int = _D.n_steps, grid: str = _D.grid, scheme: str = _D.scheme, hidden: int = _D.hidden,
               n_layers: int = _D.n_layers, n_freq: int = _D.n_freq, linear: Optional[bool] = _D.linear,
               linear_torsions: bool = _D.linear_torsions,
               epochs: int = _D.epochs,
               batch_size: int = _D.batch_size, lr: float = _D.lr, weight_decay: float = _D.weight_decay,
               ema: float = _D.ema, validation_fraction: float = _D.validation_fraction,
               patience: Optional[int] = _D.patience, minutes: Optional[float] = _D.minutes,
               likelihood_minutes: float = _D.likelihood_minutes, likelihood_lr: float = _D.likelihood_lr,
               prior_scale: float = _D.prior_scale, seed: int = _D.seed, temperature: Optional[float] = None,
               temperatures=None, energy: Optional[Callable] = None, n_validation_proposals: int = 256,
               checkpoint: Optional[str] = None, checkpoint_every: int = 10, device: str = "cpu",
               mixed_precision: bool = False, progress: bool = True,
               max_minutes: Optional[float] = None) -> PerturbedFlow:
    """Train a perturbed flow on samples by flow matching.

    Parameters
    ----------
    samples : array, (n_samples, n_atoms, 3) in nm, or (n_samples, d)
        Training configurations (molecular) or points (abstract targets).
    topology : openmm.app.Topology or mdtraj.Topology, optional
        Bonds of the molecule; with it the flow works in internal coordinates (the default then).
    coordinates : str, optional
        A registered fixed transform (:data:`openmm_flowpert.flow.TRANSFORMS`): ``"internal-cdf"``
        (the default with a topology; d = 3N - 6, bonds and angles at their own scale, each torsion
        mapped to the line by its fitted marginal: :class:`~openmm_flowpert.flow.MarginalInternal`),
        ``"internal-circle"`` (the torsions that rotate freely kept on the circle: a velocity field
        periodic in them and a uniform prior; :class:`~openmm_flowpert.flow.CircularInternal`),
        ``"internal-torus"`` (every torsion on the circle), ``"internal"`` (as ``"internal-cdf"``
        with a tanh map of the torsions) or ``"cartesian"`` (mean-free Cartesians, d = 3N - 3).
    remove_com : bool, optional
        Cartesian flows: work in the mean-free subspace (d = 3N - 3). Default: True for molecular
        samples; must be False for (n, d) arrays.
    n_steps, grid, scheme, hidden, n_layers, n_freq, linear, linear_torsions, epochs, batch_size, lr, weight_decay, \
ema, validation_fraction, patience, minutes, likelihood_minutes, likelihood_lr, prior_scale, seed
        Hyperparameters, described (with their defaults, shared with ``flowpert train``) in
        :class:`~openmm_flowpert.training.TrainingConfig`. Equal seeds give equal flows.
    temperature : float, optional
        Temperature (K) of the training data, stored as metadata; for a temperature-conditioned
        flow the reference temperature T0 (default: the lowest of ``temperatures``), at which the
        returned flow is.
    temperatures : array (n_samples,), optional
        Temperature (K) of each sample (e.g. all replicas of a replica-exchange run). The flow is
        then **temperature-conditioned**: one velocity field v(t, y; log(T / T0)) trained on all
        samples, and :meth:`PerturbedFlow.at_temperature <openmm_flowpert.PerturbedFlow.at_temperature>`
        gives the flow at any T (``FlowPerturbationMove`` does so from each thermodynamic state).
        The fixed transform is fitted to all samples.
    energy : callable, optional
        Reduced potential u(x) (kT) of positions (B, N, 3) nm. If given, the trained flow is
        validated by the median reduced energy of ``n_validation_proposals`` proposals against that
        of the training data (stored in ``metadata["training"]``; the samples at T0 for a
        temperature-conditioned flow).
    checkpoint : str, optional
        File for the training state (:meth:`FlowTrainer.state_dict`), written atomically every
        ``checkpoint_every`` epochs and at the end. If it exists, training resumes from it: an
        interrupted run resumed with the same data and arguments gives the same flow.
    device : str
        Torch device of the training (``"cpu"``, ``"cuda"``). The noise is drawn on the CPU from the
        seeded generator either way; the returned flow lives on the CPU.
    mixed_precision : bool
        bfloat16 autocast of the velocity network's forward pass on a CUDA device (loss, optimizer
        and weights stay float32; the flow and every log q are evaluated in float64 afterwards).
    progress : bool
        Show a tqdm progress bar with the training and validation losses.
    max_minutes : float, optional
        Former name of ``minutes``.

    Returns
    -------
    PerturbedFlow
        With metadata ``training`` = {epochs run, best validation loss, wall time (s), ...}.

    Examples
    --------
    >>> gmm = GaussianMixtureTarget(dim=10)                           # doctest: +SKIP
    >>> flow = train_flow(gmm.sample(20000, weights=(0.5, 0.5)), epochs=50)  # doctest: +SKIP
    """
    started = time.time()
    if max_minutes is not None:
        if minutes is not None:
            raise ValueError("pass minutes= only (max_minutes is its former name)")
        minutes = max_minutes
    config = TrainingConfig(hidden=hidden, n_layers=n_layers, n_freq=n_freq, linear=linear,
                            linear_torsions=linear_torsions, n_steps=n_steps, grid=grid,
                            scheme=scheme, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            ema=ema, validation_fraction=validation_fraction, patience=patience, minutes=minutes,
                            likelihood_minutes=likelihood_minutes, likelihood_lr=likelihood_lr,
                            prior_scale=prior_scale, seed=seed)
    return _train(samples, config, topology=topology, coordinates=coordinates, remove_com=remove_com,
                  temperature=temperature, temperatures=temperatures, energy=energy,
                  n_validation_proposals=n_validation_proposals,
                  checkpoint=checkpoint, checkpoint_every=checkpoint_every, device=device,
                  mixed_precision=mixed_precision, progress=progress, started=started)


def _train(samples, config: TrainingConfig, *, topology, coordinates: Optional[str], remove_com: Optional[bool],
           temperature: Optional[float], temperatures, energy: Optional[Callable], n_validation_proposals: int,
           checkpoint: Optional[str], checkpoint_every: int, device: str, mixed_precision: bool,
           progress: bool, started: float) -> PerturbedFlow:
    tdev = torch.device(device)
    if mixed_precision and tdev.type != "cuda":
        raise ValueError("mixed_precision=True needs device='cuda' (bfloat16 autocast on a GPU); "
                         "train in float32 on the CPU")
    if coordinates is None:
        coordinates = "internal-cdf" if topology is not None else "cartesian"
    gen = torch.Generator().manual_seed(int(config.seed))
    conditions = condition = None
    if temperatures is not None:
        t_all = np.asarray(temperatures, dtype=np.float64).reshape(-1)
        temperature = float(np.min(t_all)) if temperature is None else float(temperature)
        conditions = temperature_features(t_all, temperature, len(samples))
        condition = {"kind": "temperature", "feature": "log(T/T0)", "reference_temperature": temperature,
                     "range": [float(t_all.min()), float(t_all.max())]}
    data = prepare_data(samples, coordinates=coordinates, topology=topology, remove_com=remove_com,
                        validation_fraction=config.validation_fraction, generator=gen, device=tdev,
                        conditions=conditions)
    if energy is not None and data.n_atoms == 0:
        raise ValueError("energy validation is for molecular flows")
    trainer = FlowTrainer(data, config, gen, device=tdev, mixed_precision=mixed_precision, started=started)
    if checkpoint is not None and os.path.exists(checkpoint):
        load_checkpoint(checkpoint, trainer)
    trainer.fit(checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress)
    config = trainer.config  # with the default of ``linear`` resolved
    info = {"epochs": trainer.epoch, "best_validation_loss": trainer.best,
            "wall_time_s": round(trainer.elapsed(), 2), "hidden": config.hidden, "n_layers": config.n_layers,
            "n_freq": config.n_freq, "linear": bool(config.linear),
            "linear_torsions": bool(config.linear_torsions), "n_samples": int(data.x.shape[0]),
            "seed": int(config.seed),
            "coordinates": coordinates, "device": str(tdev), "mixed_precision": bool(mixed_precision)}
    velocity = trainer.best_velocity()
    if config.likelihood_minutes > 0:
        velocity, info["likelihood"] = _fine_tune(velocity, data, config, gen, progress)
    flow = PerturbedFlow.build(velocity, time_grid(config.n_steps, config.grid), data.transform,
                               n_particles=data.n_particles, scheme=config.scheme, prior_scale=config.prior_scale,
                               temperature=temperature, n_atoms=data.n_atoms,
                               extra={"grid": config.grid, "training": info})
    if condition is not None:
        flow.metadata["condition"] = condition
    if energy is not None:
        at_t0 = data  # a conditioned flow: validated against the frames at T0 (if there are any)
        if conditions is not None and bool((conditions[:, 0] == 0).any()):
            at_t0 = dataclasses.replace(data, x=data.x[conditions[:, 0] == 0])
        info.update(energy_validation(flow, at_t0, energy, n_validation_proposals, gen, int(config.seed)))
        flow.metadata["training"] = info
    return flow


def _fine_tune(velocity: torch.nn.Module, data, config: TrainingConfig, gen: torch.Generator, progress: bool):
    """The maximum-likelihood stage (:mod:`.likelihood`) on the flow-matching data and split."""
    if data.n_particles:
        raise ValueError("likelihood_minutes > 0 needs a plain CNF (internal coordinates or an abstract target); "
                         "mean-free Cartesian flows are not supported: use likelihood_minutes=0")
    started = time.time()
    trainer = LikelihoodTrainer(velocity, data.y_train.cpu(), data.y_val.cpu(),
                                time_grid(config.n_steps, config.grid).tolist(), gen, lr=config.likelihood_lr,
                                batch_size=min(config.batch_size, 128), ema=min(config.ema, 0.99),
                                prior_scale=config.prior_scale)
    before = trainer.best
    trainer.fit(config.likelihood_minutes, progress=progress)
    info = {"heldout_nll_before": round(before, 4), "heldout_nll_after": round(trainer.best, 4),
            "steps": trainer.steps, "wall_time_s": round(time.time() - started, 1)}
    return trainer.best_velocity(), info
