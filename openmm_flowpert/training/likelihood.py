"""Maximum-likelihood fine-tuning of a flow's velocity field (after flow matching).

Flow matching regresses the velocity on a path; it does not maximize the likelihood of the data,
which is what importance weights reward (the forward KL divergence E_p[log p/q] is the held-out
negative log-likelihood up to a constant). This stage continues from the flow-matching weights and
minimizes the negative log-likelihood of the training samples under the continuous flow,

    log q(y) = log p_Z(z) - int_0^1 div v(t, y_t) dt,    y_1 = y, y_0 = z,

integrated backwards from the data (t = 1) to the prior (t = 0) with RK4 on the flow's own time
grid, the divergence estimated by Hutchinson's estimator with one Gaussian probe per sample (the
integral is linear in the divergence, so the estimate of log q and of its gradient is unbiased).
The trained flow is still the discrete map of :mod:`openmm_flowpert.flow.cnf`, whose density the
package's estimators compute exactly or without bias; the fine-tuning only moves the weights.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["continuous_log_likelihood", "LikelihoodTrainer", "fine_tune_likelihood"]


def _vel_div(velocity: torch.nn.Module, t: float, y: torch.Tensor, e: torch.Tensor, create_graph: bool = True):
    """v(t, y) and the Hutchinson divergence e^T (dv/dy) e, differentiable in the weights (with
    ``create_graph`` and grad mode on; values only otherwise, e.g. for a validation score)."""
    if not y.requires_grad:
        y = y.requires_grad_(True)
    v = velocity(torch.full((1, 1), t, dtype=y.dtype, device=y.device), y)
    (g,) = torch.autograd.grad(v, y, e, create_graph=create_graph and torch.is_grad_enabled())
    return v, (g * e).sum(1)


def _rk4_with_divergence(velocity: torch.nn.Module, y: torch.Tensor, steps: Sequence[Tuple[float, float]],
                          probes: torch.Tensor, create_graph: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """RK4 from y (B, D) over signed steps ``(t, H)`` (H < 0 runs backwards in time), and the integral
    of Hutchinson's divergence over the time covered, sum |H| * (d1 + 2 d2 + 2 d3 + d4) / 6 (B,):
    the end point and the integral, differentiable in the weights with ``create_graph``."""
    div_int = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    for t, H in steps:
        k1, d1 = _vel_div(velocity, t, y, probes, create_graph)
        k2, d2 = _vel_div(velocity, t + 0.5 * H, y + 0.5 * H * k1, probes, create_graph)
        k3, d3 = _vel_div(velocity, t + 0.5 * H, y + 0.5 * H * k2, probes, create_graph)
        k4, d4 = _vel_div(velocity, t + H, y + H * k3, probes, create_graph)
        y = y + H * (k1 + 2.0 * k2 + 2.0 * k3 + k4) / 6.0
        div_int = div_int + abs(H) * (d1 + 2.0 * d2 + 2.0 * d3 + d4) / 6.0
    return y, div_int


def _log_prior(z: torch.Tensor, prior_scale: float, periodic: Sequence[int] = ()) -> torch.Tensor:
    """log p_Z(z) (B,) in nats: N(0, s^2) on the plain coordinates, uniform on the circle for the
    ``periodic`` ones."""
    per = list(periodic)
    plain = z if not per else z[:, [i for i in range(z.shape[1]) if i not in set(per)]]
    D = plain.shape[1]
    return (-0.5 * (plain * plain).sum(1) / prior_scale ** 2
            - D * (math.log(prior_scale) + 0.5 * math.log(2 * math.pi)) - len(per) * math.log(2 * math.pi))


def continuous_log_likelihood(velocity: torch.nn.Module, y: torch.Tensor, times: Sequence[float],
                              probes: torch.Tensor, prior_scale: float = 1.0,
                              create_graph: bool = True) -> torch.Tensor:
    """Hutchinson estimate of log q(y) (nats, CNF coordinates) of the continuous flow, shape (B,).

    Parameters
    ----------
    velocity : nn.Module
        v(t (1, 1), y (B, D)) -> (B, D); a plain (not mean-free) CNF.
    y : Tensor (B, D)
        Samples in the CNF's coordinates (the fixed transform already inverted).
    times : sequence of float
        The time grid t_0 = 0 < ... < t_K = 1 (RK4 steps backwards over it).
    probes : Tensor (B, D)
        Gaussian probe vectors of the divergence estimate (one per sample, the same at every stage).
    prior_scale : float
        Standard deviation s of the Gaussian prior N(0, s^2 I) (uniform on the circle for the
        velocity's ``periodic`` coordinates, whose field is 2 pi-periodic).
    create_graph : bool
        Keep the graph for a gradient in the weights (False: the value only, less work).
    """
    steps = [(float(times[k]), -float(times[k] - times[k - 1])) for k in range(len(times) - 1, 0, -1)]
    z, div_int = _rk4_with_divergence(velocity, y.detach().clone().requires_grad_(True), steps, probes, create_graph)
    return _log_prior(z, prior_scale, getattr(velocity, "periodic", [])) - div_int


class LikelihoodTrainer:
    """Adam on the negative log-likelihood of the training samples, with EMA weights.

    Parameters
    ----------
    velocity : nn.Module
        The flow-matching velocity (float32, a copy is trained).
    y_train, y_val : Tensor (n, D) float32
        Training and validation samples in the CNF's coordinates.
    times : sequence of float
        The flow's time grid.
    generator : torch.Generator
        Seeded source of batches and probes.
    lr, batch_size, ema, prior_scale : float, int, float, float
        Learning rate (cosine decay over the budget), samples per step, EMA decay, prior scale.
    n_val : int
        Validation samples (fixed probes) scored after every ``val_every`` steps; the EMA weights of
        the best validation log-likelihood are kept.
    """

    def __init__(self, velocity: torch.nn.Module, y_train: torch.Tensor, y_val: torch.Tensor,
                 times: Sequence[float], generator: torch.Generator, lr: float = 2e-4, batch_size: int = 256,
                 ema: float = 0.999, prior_scale: float = 1.0, n_val: int = 1024, val_every: int = 100):
        self.velocity = copy.deepcopy(velocity).float().train()
        for p in self.velocity.parameters():
            p.requires_grad_(True)
        self.ema_model = copy.deepcopy(self.velocity)
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.y_train, self.times, self.gen = y_train.float(), [float(t) for t in times], generator
        self.lr, self.batch_size, self.ema, self.prior_scale = lr, int(batch_size), float(ema), float(prior_scale)
        self.opt = torch.optim.Adam(self.velocity.parameters(), lr=lr)
        vgen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
        self.y_val = (y_val if y_val.shape[0] else y_train)[:n_val].float()  # no held-out set: score training samples
        self.e_val = torch.randn(self.y_val.shape, generator=vgen)
        self.val_every = int(val_every)
        self.best = self.validation()
        self.best_state = copy.deepcopy(self.ema_model.state_dict())
        self.history = [(0, self.best)]

    def validation(self) -> float:
        """Mean negative log-likelihood (nats) of the validation samples under the EMA weights."""
        out = []
        for b0 in range(0, self.y_val.shape[0], 512):
            with torch.enable_grad():
                ll = continuous_log_likelihood(self.ema_model, self.y_val[b0:b0 + 512], self.times,
                                               self.e_val[b0:b0 + 512], self.prior_scale, create_graph=False)
            out.append(ll.detach())
        return float(-torch.cat(out).mean())

    def step(self) -> float:
        """One optimizer step on a random batch; returns its mean negative log-likelihood."""
        idx = torch.randint(0, self.y_train.shape[0], (self.batch_size,), generator=self.gen)
        y = self.y_train[idx]
        e = torch.randn(y.shape, generator=self.gen)
        loss = -continuous_log_likelihood(self.velocity, y, self.times, e, self.prior_scale).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for pe, p in zip(self.ema_model.parameters(), self.velocity.parameters()):
                pe.mul_(self.ema).add_(p.detach(), alpha=1 - self.ema)
        return float(loss.detach())

    def fit(self, minutes: float, max_steps: Optional[int] = None, progress: bool = False) -> None:
        """Train for ``minutes`` of wall time, the learning rate decaying on a cosine over that time;
        with ``max_steps``, over that many steps instead (reproducible), the time still a hard cap."""
        t0 = time.time()
        n = 0
        while True:
            used = (time.time() - t0) / (60.0 * minutes)
            if used >= 1.0 or (max_steps is not None and n >= max_steps):
                break
            frac = used if max_steps is None else n / max_steps
            for g in self.opt.param_groups:
                g["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
            loss = self.step()
            n += 1
            if n % self.val_every == 0:
                val = self.validation()
                self.history.append((n, val))
                if val < self.best:
                    self.best, self.best_state = val, copy.deepcopy(self.ema_model.state_dict())
                if progress:
                    print(f"likelihood step {n}: train nll {loss:.3f}, val nll {val:.3f} (best {self.best:.3f}), "
                          f"{time.time() - t0:.0f} s", flush=True)
        self.steps = n

    def best_velocity(self) -> torch.nn.Module:
        """The EMA network with the weights of the best validation likelihood."""
        self.ema_model.load_state_dict(self.best_state)
        return self.ema_model


def fine_tune_likelihood(flow, samples, *, minutes: float, n_steps: Optional[int] = None, grid: str = "quadratic",
                         lr: float = 2e-4, batch_size: int = 256, ema: float = 0.999,
                         validation_fraction: float = 0.1, seed: int = 0, max_steps: Optional[int] = None,
                         progress: bool = False):
    """Maximum-likelihood fine-tuning of a trained flow on samples (see the module docstring).

    Parameters
    ----------
    flow : PerturbedFlow
        A flow with a :class:`~openmm_flowpert.flow.VelocityMLP` velocity and a plain CNF
        (internal-coordinate molecular flows and abstract targets; not mean-free Cartesian flows).
    samples : array, (n, n_atoms, 3) nm or (n, d)
        Samples of the target (e.g. the flow-matching training set).
    minutes : float
        Wall-clock budget of the fine-tuning (> 0).
    n_steps : int, optional
        Integrator steps of the returned flow (and of the likelihood it is trained on), on ``grid``;
        default: the flow's own time grid.
    lr, batch_size, ema, validation_fraction, seed
        Adam learning rate (cosine decay over the budget), samples per step, EMA decay of the
        weights, held-out fraction (the best held-out likelihood picks the weights), seed.
    max_steps : int, optional
        Stop after this many optimizer steps even within the budget (a reproducible run: equal
        seeds and steps give equal flows, whatever the machine's speed).

    Returns
    -------
    PerturbedFlow
        The flow with the fine-tuned weights; ``metadata["likelihood"]`` records the held-out
        negative log-likelihood (nats, CNF coordinates) before and after, steps and wall time.
    """
    from ..flow import time_grid

    if not minutes > 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    if flow.info.latent_particles:
        raise ValueError("likelihood fine-tuning needs a plain CNF (internal coordinates or an abstract target); "
                         "this flow is mean-free in Cartesian coordinates")
    started = time.time()
    velocity, transform = flow.parts()
    x = torch.as_tensor(samples, dtype=torch.float64).reshape(len(samples), -1)
    with torch.no_grad():
        y, _ = transform.inverse(x)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(y.shape[0], generator=gen)
    n_val = max(1, int(validation_fraction * y.shape[0]))
    times = flow.info.times if n_steps is None else time_grid(int(n_steps), grid).tolist()
    trainer = LikelihoodTrainer(velocity, y[perm[n_val:]].float(), y[perm[:n_val]].float(), times, gen, lr=lr,
                                batch_size=batch_size, ema=ema, prior_scale=flow.prior_scale)
    before = trainer.best
    trainer.fit(minutes, max_steps=max_steps, progress=progress)
    out = flow.rebuilt(trainer.best_velocity(), torch.tensor(times, dtype=torch.float64))
    out.metadata["likelihood"] = {"heldout_nll_before": before, "heldout_nll_after": trainer.best,
                                  "steps": trainer.steps, "batch_size": int(batch_size), "lr": lr, "ema": ema,
                                  "n_steps": len(times) - 1, "wall_time_s": round(time.time() - started, 1),
                                  "seed": int(seed)}
    return out
