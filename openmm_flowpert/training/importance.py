"""Importance-weighted refinement of a trained flow: train on its own proposals, resampled by W.

Flow matching on samples of the target p fits q to p on average; where q puts too little mass, the
importance weights W = exp(-u(x)) / q(x) of its proposals are large, and those few proposals set
the Kish ESS. One round of this stage

1. draws ``n_proposals`` proposals x ~ q with an unbiased estimate of log q (fp++ by default: a
   few ms each, against ~100 ms for the exact Jacobian),
2. weighs them with log W = -u(x) - log q(x) (u in kT; NaN energies or log q: weight 0) and draws
   as many of them again in proportion to W (systematic resampling), which is a sample of p
   that repeats the proposals q under-weights,
3. continues flow matching (the weights of the flow as the start, Adam with cosine decay, EMA) on
   those configurations, mixed with ``data_fraction`` of the original samples so that the flow
   keeps what the data taught it,

and the rounds repeat with the refined flow. Only log q is needed, never its gradient; W is
unbiased with fp / fp++, so in expectation the resampled set is distributed as p whatever the
estimator's noise. The sampler's exactness does not depend on any of this: the refined flow is an
ordinary perturbed flow whose density the estimators compute exactly or without bias.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch

from ..metropolis import systematic_resample
from ..noise import Noise
from .config import TrainingConfig
from .data import TrainingData, split
from .trainer import FlowTrainer

__all__ = ["refine_by_importance", "resample_by_log_weights", "kish_fraction"]


def kish_fraction(log_w: np.ndarray) -> float:
    """Kish effective sample size / n of log-weights (non-finite entries count as weight 0)."""
    lw = np.where(np.isfinite(log_w), log_w, -np.inf)
    if not np.isfinite(lw).any():
        return 0.0
    w = np.exp(lw - lw.max())
    return float(w.sum() ** 2 / (w ** 2).sum() / len(w))


def resample_by_log_weights(log_w: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` draws in proportion to exp(log_w) (systematic resampling with one uniform
    from ``rng``; non-finite log-weights count as weight 0)."""
    lw = np.where(np.isfinite(log_w), log_w, -np.inf)
    if not np.isfinite(lw).any():
        raise ValueError("importance refinement: every proposal has weight 0 (NaN or infinite energies or log q); "
                         "check the energy function's units (kT) and the flow's temperature")
    w = torch.from_numpy(np.exp(lw - lw.max()))
    return systematic_resample(w / w.sum(), torch.tensor([rng.random()]), n).numpy()


def refine_by_importance(flow, energy: Callable, samples=None, *, rounds: int = 3, n_proposals: int = 4096,
                         epochs: int = 20, lr: float = 2e-4, batch_size: int = 512, ema: float = 0.99,
                         data_fraction: float = 0.5, estimator: str = "fp++", seed: int = 0,
                         progress: bool = False):
    """Refine a trained flow by flow matching on its own proposals resampled by their weights.

    Parameters
    ----------
    flow : PerturbedFlow
        A flow with a :class:`~openmm_flowpert.flow.VelocityMLP` velocity (one from
        :func:`~openmm_flowpert.train_flow`).
    energy : callable
        Reduced potential u(x) in kT of positions (B, N, 3) nm (molecules) or points (B, d),
        returning B values (e.g. :class:`~openmm_flowpert.energies.ReducedPotential`).
    samples : array, optional
        Samples of the target, (n, N, 3) nm or (n, d) (e.g. the training set), mixed into every
        round as ``data_fraction`` of its training set.
    rounds, n_proposals, epochs : int
        Rounds of propose-weigh-resample-train; proposals per round (also the resampled set's
        size); flow-matching epochs per round over the round's set.
    lr, batch_size, ema : float, int, float
        Adam learning rate (cosine decay within each round), samples per step, EMA decay.
    data_fraction : float
        Share of original samples in each round's training set, in [0, 1) (0 with no samples).
    estimator : str
        Estimator of log q for the weights: "fp++" (default), "fp" or "jacobian" (exact, ~15x the cost).
    seed : int
        Seeds the proposals, the resampling and the training: equal seeds, equal flows.

    Returns
    -------
    PerturbedFlow
        The refined flow; ``metadata["importance"]`` lists per round the Kish ESS fraction of
        the round's proposals (the flow before that round's training), the mean reduced energy of
        the proposals (kT), the distinct proposals in the resampled set and the seconds spent.

    Examples
    --------
    >>> refined = refine_by_importance(flow, ReducedPotential(system, 300.0), frames, rounds=3)  # doctest: +SKIP
    """
    for name, value in (("rounds", rounds), ("n_proposals", n_proposals), ("epochs", epochs)):
        if int(value) < 1:
            raise ValueError(f"importance refinement: {name} must be >= 1, got {value}")
    if not 0.0 <= data_fraction < 1.0:
        raise ValueError(f"importance refinement: data_fraction must be in [0, 1), got {data_fraction}")
    if flow.conditioned:
        raise ValueError("importance refinement: temperature-conditioned flows are not supported; refine "
                         "flow.at_temperature(T) of an unconditioned flow, or train one per temperature")
    velocity, transform = flow.parts()
    y_data = _data_coordinates(transform, samples) if samples is not None and data_fraction > 0 else None
    rng = np.random.default_rng(int(seed))
    gen = torch.Generator().manual_seed(int(seed))
    noise = Noise(int(seed))
    history = []
    for r in range(int(rounds)):
        t0 = time.time()
        prop = flow.propose(int(n_proposals), noise, estimator=estimator)
        u = np.asarray(energy(prop.x), dtype=np.float64).reshape(-1)
        log_w = -u - prop.log_q.numpy()
        idx = resample_by_log_weights(log_w, int(n_proposals), rng)
        with torch.no_grad():
            y_new, _ = transform.inverse(prop.x.reshape(len(u), -1).to(torch.float64)[torch.as_tensor(idx)])
        y = y_new[torch.isfinite(y_new).all(1)]
        if y_data is not None:
            n_data = int(round(data_fraction / (1 - data_fraction) * y.shape[0]))
            y = torch.cat([y, y_data[torch.randint(0, y_data.shape[0], (n_data,), generator=gen)]])
        velocity = _flow_matching(velocity, y.float(), flow, transform, gen, epochs=int(epochs), lr=lr,
                                  batch_size=int(batch_size), ema=ema, seed=int(seed) + r, progress=progress)
        flow = flow.rebuilt(velocity)
        ok = np.isfinite(u)
        history.append({"round": r + 1, "kish_ess_before": kish_fraction(log_w),
                        "mean_u": float(u[ok].mean()) if ok.any() else float("nan"),
                        "distinct_resampled": int(len(np.unique(idx))), "seconds": round(time.time() - t0, 1)})
        if progress:
            print(f"importance round {r + 1}: {history[-1]}", flush=True)
    flow.metadata["importance"] = {"rounds": history, "n_proposals": int(n_proposals), "epochs": int(epochs),
                                   "lr": lr, "batch_size": int(batch_size), "ema": ema,
                                   "data_fraction": data_fraction, "estimator": estimator, "seed": int(seed)}
    return flow


def _data_coordinates(transform, samples) -> torch.Tensor:
    """Samples -> the CNF's coordinates through the flow's fixed transform (finite rows only)."""
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    x = x.reshape(x.shape[0], -1)
    with torch.no_grad():
        y, _ = transform.inverse(x)
    return y[torch.isfinite(y).all(1)]


def _flow_matching(velocity: torch.nn.Module, y: torch.Tensor, flow, transform, gen: torch.Generator, *, epochs: int,
                   lr: float, batch_size: int, ema: float, seed: int, progress: bool) -> torch.nn.Module:
    """Continue flow matching of ``velocity`` on y (float32, the CNF's coordinates): the EMA weights
    of the best validation loss (the starting weights when no epoch improves on them)."""
    cfg = velocity.config()
    config = TrainingConfig(hidden=cfg["hidden"], n_layers=cfg["n_layers"], n_freq=cfg["n_freq"],
                            linear=bool(cfg.get("linear", False)),
                            linear_torsions=not cfg.get("linear_exclude"), epochs=epochs,
                            batch_size=batch_size, lr=lr, ema=ema, prior_scale=flow.prior_scale, seed=seed)
    y_train, y_val = split(y, 0.1, gen, torch.device("cpu"))
    data = TrainingData(torch.zeros(0, 0), flow.n_atoms, flow.remove_com, transform, flow.info.latent_particles,
                        y_train, y_val)
    trainer = FlowTrainer(data, config, gen)
    start = copy.deepcopy(velocity).float().state_dict()
    trainer.velocity.load_state_dict(start)
    trainer.ema_model.load_state_dict(start)
    trainer.best_state = copy.deepcopy(start)
    trainer.best = trainer.validation_loss(float("inf"))
    trainer.fit(progress=progress)
    return trainer.best_velocity().double()
