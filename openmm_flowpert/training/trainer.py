"""The flow-matching trainer: velocity network, EMA weights, optimizer, schedule and checkpoints.

Path: y_t = (1 - t) z + t y_1 with z ~ N(0, s^2 I) (projected when the CNF is mean-free) and y_1 a
training sample in the CNF's coordinates; the regression target of v(t, y_t) is y_1 - z. Angle
coordinates (the transform's ``periodic()``) follow the shortest arc on the circle instead:
z uniform on [-pi, pi), y_t = z + t a with a = wrap(y_1 - z) in [-pi, pi), target a. Trained
in float32 with Adam, cosine decay of the learning rate per step and an exponential moving average
(EMA) of the weights; the validation loss of the EMA weights on fixed noise picks the best epoch.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from typing import Optional

import torch

from .. import _files
from ..estimators.math import angle_from_normal, wrap_angle
from ..flow import VelocityMLP
from ..noise import project_mean_free
from .config import TrainingConfig
from .data import TrainingData

__all__ = ["FlowTrainer", "save_checkpoint", "load_checkpoint"]


class FlowTrainer:
    """Trains a :class:`~openmm_flowpert.flow.VelocityMLP` on :class:`TrainingData`.

    ``generator`` is the seeded generator that split the data; batches, their prior samples and
    times continue on it. :meth:`state_dict` / :meth:`load_state_dict` hold everything a resumed
    run needs to continue bit for bit (weights, EMA, optimizer, schedule, generator, best epoch).
    ``config.linear=None`` becomes True when the data's transform has torsions (a molecule in
    internal coordinates), False otherwise. ``started``: the wall-clock time the run's budget
    counts from (default: now).
    """

    def __init__(self, data: TrainingData, config: TrainingConfig, generator: torch.Generator,
                 device="cpu", mixed_precision: bool = False, started: Optional[float] = None):
        if config.linear is None:  # the default: a linear map for molecules in internal coordinates
            config = dataclasses.replace(config, linear=bool(data.torsions))
        self.data, self.config, self.gen = data, config, generator
        self.device = torch.device(device)
        self.mixed_precision = bool(mixed_precision)
        self.started = time.time() if started is None else float(started)
        torch.manual_seed(int(config.seed))  # the initialization
        self.periodic = data.periodic
        self.velocity = VelocityMLP(data.dim, hidden=config.hidden, n_layers=config.n_layers,
                                    n_freq=config.n_freq, n_cond=data.n_cond, periodic=self.periodic,
                                    linear=config.linear,
                                    linear_exclude=() if config.linear_torsions else data.torsions).to(self.device)
        self.ema_model = copy.deepcopy(self.velocity)
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.Adam(self.velocity.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = max(1, math.ceil(data.y_train.shape[0] / config.batch_size))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=config.epochs * self.steps_per_epoch)
        # fixed validation noise, so that validation losses are comparable across epochs
        vgen = torch.Generator().manual_seed(int(config.seed) + 1)
        n_val = data.y_val.shape[0]
        self.z_val = self.draw_prior(n_val, vgen) if n_val else None
        self.t_val = torch.rand(n_val, 1, generator=vgen).to(self.device) if n_val else None
        self.best, self.best_state = float("inf"), copy.deepcopy(self.ema_model.state_dict())
        self.since_best, self.epoch = 0, 0
        self.samples = samples_fingerprint(data)

    # -- the loss ------------------------------------------------------------------------------------
    def draw_prior(self, n: int, g: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.data.dim, generator=g)
        npart = self.data.n_particles
        z = self.config.prior_scale * (project_mean_free(z, npart) if npart else z)
        if self.periodic:
            z[:, self.periodic] = angle_from_normal(z[:, self.periodic] / self.config.prior_scale)
        return z.to(self.device)

    def loss(self, model: torch.nn.Module, y1: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
             c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean squared error of the (projected) velocity against y1 - z at y_t = (1 - t) z + t y1
        (at the samples' conditions ``c`` for a conditioned field); for angle coordinates y1 - z
        is wrapped into [-pi, pi) (the shortest arc)."""
        target = y1 - z
        if self.periodic:
            target[:, self.periodic] = wrap_angle(target[:, self.periodic])
            yt = z + t * target
        else:
            yt = (1 - t) * z + t * y1
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision):
            v = model(t, yt) if c is None else model.forward_cond(t, yt, c)
        v = v.float()
        npart = self.data.n_particles
        return (((project_mean_free(v, npart) if npart else v) - target) ** 2).sum(1).mean()

    # -- one epoch -----------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        """One pass over the training data in a random order; returns the mean training loss."""
        y_train, bs, ema = self.data.y_train, self.config.batch_size, self.config.ema
        self.velocity.train()
        order = torch.randperm(y_train.shape[0], generator=self.gen)
        total = 0.0
        c_train = self.data.c_train
        for i in range(self.steps_per_epoch):
            rows = order[i * bs:(i + 1) * bs]
            y1 = y_train[rows]
            loss = self.loss(self.velocity, y1, self.draw_prior(y1.shape[0], self.gen),
                             torch.rand(y1.shape[0], 1, generator=self.gen).to(self.device),
                             None if c_train is None else c_train[rows])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            with torch.no_grad():
                for pe, p in zip(self.ema_model.parameters(), self.velocity.parameters()):
                    pe.mul_(ema).add_(p.detach(), alpha=1 - ema)
            total += float(loss.detach()) * y1.shape[0]
        return total / y_train.shape[0]

    @torch.no_grad()
    def validation_loss(self, train_loss: float) -> float:
        """Loss of the EMA weights on the held-out samples (the training loss if there are none)."""
        if self.z_val is None:
            return train_loss
        return float(self.loss(self.ema_model, self.data.y_val, self.z_val, self.t_val, self.data.c_val))

    def record(self, epoch: int, val: float) -> bool:
        """Book-keeping after an epoch; True when training should stop (patience or time budget)."""
        self.epoch = epoch
        if val < self.best:
            self.best, self.best_state, self.since_best = val, copy.deepcopy(self.ema_model.state_dict()), 0
        else:
            self.since_best += 1
        c = self.config
        return ((c.patience is not None and self.since_best >= c.patience)
                or (c.minutes is not None and self.elapsed() > 60.0 * c.minutes))

    def elapsed(self) -> float:
        """Seconds of this run, including the time of the runs it resumed."""
        return time.time() - self.started

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, checkpoint: Optional[str] = None, checkpoint_every: int = 10, progress: bool = True) -> None:
        """Train from the current epoch to ``config.epochs`` (or until :meth:`record` says stop),
        writing the state to ``checkpoint`` every ``checkpoint_every`` epochs and at the end."""
        epochs = self.config.epochs
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs, desc="train flow", unit="epoch")
            if self.epoch:
                bar.update(self.epoch)
        for epoch in range(self.epoch + 1, epochs + 1):
            train_loss = self.train_epoch()
            val = self.validation_loss(train_loss)
            stopped = self.record(epoch, val)
            if bar is not None:
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{self.best:.4f}")
                bar.update(1)
            if checkpoint is not None and (stopped or epoch % checkpoint_every == 0 or epoch == epochs):
                save_checkpoint(checkpoint, self)
            if stopped:
                break
        if bar is not None:
            bar.close()

    def best_velocity(self) -> torch.nn.Module:
        """The EMA network with the weights of the best validation loss, on the CPU."""
        self.ema_model.load_state_dict(self.best_state)
        return self.ema_model.cpu()

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs (plus ``dim`` and ``seed``, to recognize the run)."""
        return {"velocity": self.velocity.state_dict(), "ema": self.ema_model.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "gen": self.gen.get_state(),
                "best": self.best, "best_state": self.best_state, "since_best": self.since_best,
                "epoch": self.epoch, "elapsed": self.elapsed(), "dim": self.data.dim, "seed": int(self.config.seed),
                "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the wall-clock budget counts the time already spent)."""
        if state.get("dim") != self.data.dim or state.get("seed") != int(self.config.seed):
            raise ValueError(f"the training state belongs to another run (dimension {state.get('dim')}, seed "
                             f"{state.get('seed')}; this run: {self.data.dim}, {int(self.config.seed)})")
        if state.get("samples", self.samples) != self.samples:  # checkpoints before 2026-12-07 carry none
            raise ValueError(f"the training state belongs to other training samples ({state['samples']}; this run: "
                             f"{self.samples})")
        self.velocity.load_state_dict(state["velocity"])
        self.ema_model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"])
        self.best, self.best_state, self.since_best = state["best"], state["best_state"], state["since_best"]
        self.epoch = state["epoch"]
        self.started -= state["elapsed"]


def samples_fingerprint(data: TrainingData) -> str:
    """``"N frames, sha1 HEX"`` of the samples as given (float64) and their conditions: a resumed run must
    train on the same frames (another --data, --stride or --rare-share changes it)."""
    h = hashlib.sha1(data.x.detach().cpu().contiguous().numpy().tobytes())
    for c in (data.c_train, data.c_val):
        if c is not None:
            h.update(c.detach().cpu().contiguous().numpy().tobytes())
    return f"{data.x.shape[0]} frames, sha1 {h.hexdigest()[:12]}"


def run_settings(config: TrainingConfig) -> dict:
    """The settings that make two training runs the same run: all but the stopping rules
    (``minutes``, ``patience``), which a resumed run may change."""
    cfg = dataclasses.asdict(config)
    for key in ("minutes", "patience"):
        cfg.pop(key, None)
    return cfg


def _run_config(trainer: FlowTrainer) -> dict:
    return {"dim": int(trainer.data.dim), **run_settings(trainer.config)}


def save_checkpoint(path: str, trainer: FlowTrainer) -> None:
    """Write the trainer's state to ``path`` atomically, tagged with the run's settings."""
    _files.save_checkpoint(path, "training", _run_config(trainer), {"trainer": trainer.state_dict()})


def load_checkpoint(path: str, trainer: FlowTrainer) -> None:
    """Resume ``trainer`` from the checkpoint file ``path``; a checkpoint of other settings (network
    size, schedule, seed, data dimension), a foreign or a damaged file is refused with one line."""
    ck = _files.load_checkpoint(path, "training", _run_config(trainer))
    try:
        trainer.load_state_dict(ck["trainer"])
    except (ValueError, RuntimeError, KeyError) as exc:
        why = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
        raise ValueError(f"training checkpoint {path!r} does not fit this run ({why}); delete it "
                         "or use another checkpoint path") from None
