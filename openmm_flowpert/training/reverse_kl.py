"""Energy-based fine-tuning of a trained flow: the reverse KL divergence, mixed with maximum likelihood.

Flow matching and maximum likelihood fit q to samples of p (the forward divergence KL(p || q)); the
importance weights W = exp(-u) / q are judged by how q covers p where q puts its own samples. The
reverse divergence measures exactly that,

    KL(q || p) + log Z = E_{x ~ q}[u(x) + log q(x)]     (u in kT, log q in nats),

and its gradient in the weights needs the energy's gradient along the flow's samples and the gradient
of log q. For a sample x = T(y_1), y_1 the end of the ODE from z ~ N(0, s^2 I) at t = 0,

    log q(x) = log p_Z(z) - int_0^1 div v(t, y_t) dt - log |det dT/dy|(y_1),

integrated forwards with RK4 on the flow's own time grid, the divergence by Hutchinson's estimator
with one Gaussian probe per sample (linear in the divergence, so unbiased, as in
:mod:`.likelihood`). The energies and forces come from OpenMM (:meth:`~openmm_flowpert.energies.
ReducedPotential.reduced_energies_and_gradients`); u is softly capped above ``energy_cap`` (log growth
beyond it) so that a few clashing samples do not dominate a step. The reverse divergence alone is
mode-seeking (a rare basin can be dropped at little cost), so every step adds the negative
log-likelihood of a batch of the data:

    loss = kl_weight * E_q[u + log q] + (1 - kl_weight) * E_data[-log q].

The result is an ordinary discrete flow whose density the estimators compute exactly or without bias:
the training objective changes the weights, never the sampler's exactness.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from .likelihood import LikelihoodTrainer, _log_prior, _rk4_with_divergence, continuous_log_likelihood

__all__ = ["forward_log_density", "sample_log_density", "ReverseKLTrainer", "fine_tune_reverse_kl"]

EnergyAndGradient = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


def forward_log_density(velocity: torch.nn.Module, z: torch.Tensor, times: Sequence[float],
                        probes: torch.Tensor, prior_scale: float = 1.0,
                        create_graph: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The flow's sample y_1 (B, D) of latents z (B, D) and the Hutchinson estimate of log q(y_1) (B,)
    in nats (CNF coordinates), both differentiable in the velocity's weights.

    ``times``: the time grid (RK4 forwards over it); ``probes`` (B, D): Gaussian probe vectors, the
    same at every stage; ``prior_scale``: s of the prior N(0, s^2 I); ``create_graph=False``: values
    only (validation).
    """
    if getattr(velocity, "periodic", []):
        raise ValueError("reverse-KL fine-tuning: flows with periodic coordinates are not supported")
    steps = [(float(times[k]), float(times[k + 1] - times[k])) for k in range(len(times) - 1)]
    y, div_int = _rk4_with_divergence(velocity, z.detach().clone(), steps, probes, create_graph)
    return y, _log_prior(z, prior_scale) - div_int


def sample_log_density(velocity: torch.nn.Module, transform: torch.nn.Module, z: torch.Tensor,
                       times: Sequence[float], probes: torch.Tensor,
                       prior_scale: float = 1.0, create_graph: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The flow's sample x = T(y_1) (B, x_dim) (nm for molecules) and the Hutchinson estimate of
    log q(x) = log q(y_1) - log |det dx/dy| (B,) in nats, differentiable in the velocity's weights.
    ``transform``: the flow's fixed transform, y -> (x, log |det dx/dy|); the rest as
    :func:`forward_log_density`."""
    y, log_q_y = forward_log_density(velocity, z, times, probes, prior_scale, create_graph)
    x, logdet = transform(y.double())
    return x, log_q_y.double() - logdet


class _ReducedEnergy(torch.autograd.Function):
    """u(x) (B,) kT of x (B, x_dim) (positions in nm for molecules) through a NumPy callable
    x -> (u (B,) kT, du/dx of any shape with B * x_dim entries). Rows whose energy or gradient is
    not finite get u = +inf and a zero gradient (the loss drops them; 0 * NaN would poison the step;
    a NaN inside the flow's own pass still does, and that step is skipped and counted)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, energy: EnergyAndGradient) -> torch.Tensor:
        u, g = energy(x.detach().cpu().numpy())
        u = torch.as_tensor(np.asarray(u, dtype=np.float64), dtype=x.dtype, device=x.device).clone()
        g = torch.as_tensor(np.asarray(g, dtype=np.float64), dtype=x.dtype, device=x.device).reshape(x.shape).clone()
        bad = ~torch.isfinite(u) | ~torch.isfinite(g).all(1)
        u[bad], g[bad] = math.inf, 0.0
        ctx.save_for_backward(g)
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):
        (g,) = ctx.saved_tensors
        return grad_u[:, None] * g, None


def soft_cap(u: torch.Tensor, cap: float) -> torch.Tensor:
    """u below ``cap``, cap + log(1 + u - cap) above it (kT; monotone, continuous slope 1 at the cap)."""
    over = torch.clamp(u - cap, min=0.0)
    return torch.where(u > cap, cap + torch.log1p(over), u)


class ReverseKLTrainer(LikelihoodTrainer):
    """Adam on ``kl_weight * E_q[u + log q] + (1 - kl_weight) * E_data[-log q]`` with EMA weights.

    Parameters (beyond :class:`~.likelihood.LikelihoodTrainer`'s)
    ----------
    transform : nn.Module
        The flow's fixed transform y -> (x (B, 3N) nm, log |det|), float64.
    energy : callable
        x (B, x_dim) (nm for molecules: x_dim = 3N) -> (u (B,) kT, du/dx (B, x_dim) or (B, N, 3)
        kT/nm), NumPy arrays, e.g. ``ReducedPotential(system, T).reduced_energies_and_gradients``.
    kl_weight : float
        Weight of the reverse divergence in (0, 1]; the rest goes to the data's likelihood.
    energy_cap : float
        Reduced energy (kT) above which u grows only logarithmically in the loss.
    n_samples : int
        Flow samples per step (the data batch is ``batch_size``).

    The validation score is the same mixture on fixed latents, probes and held-out samples; the EMA
    weights of the best score are kept.
    """

    def __init__(self, velocity, y_train, y_val, times, generator, *, transform, energy: EnergyAndGradient,
                 kl_weight: float = 0.5, energy_cap: float = 100.0, n_samples: int = 128, n_val_samples: int = 512,
                 **kw):
        self.transform, self.energy = transform, energy
        self.parts_history = []
        self.skipped = 0  # steps whose gradient was not finite (not applied)
        self.verbose = bool(kw.pop("verbose", False))
        self.kl_weight, self.energy_cap, self.n_samples = float(kl_weight), float(energy_cap), int(n_samples)
        vgen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
        dim = y_train.shape[1]
        self.z_val = torch.randn(n_val_samples, dim, generator=vgen) * kw.get("prior_scale", 1.0)
        self.ez_val = torch.randn(n_val_samples, dim, generator=vgen)
        super().__init__(velocity, y_train, y_val, times, generator, **kw)

    def reverse_kl(self, model: torch.nn.Module, z: torch.Tensor, e: torch.Tensor,
                   create_graph: bool = True) -> torch.Tensor:
        """Per-sample u + log q (capped u; kT = nats) of the flow's finite samples of ``z`` (the
        samples with a non-finite energy or density left out)."""
        x, log_q = sample_log_density(model, self.transform, z, self.times, e, self.prior_scale, create_graph)
        u = _ReducedEnergy.apply(x, self.energy)
        ok = torch.isfinite(u) & torch.isfinite(log_q)
        per = torch.where(ok, soft_cap(u, self.energy_cap) + log_q, torch.zeros_like(u))
        return per[ok]

    def _score(self, kl: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        return self.kl_weight * kl + (1.0 - self.kl_weight) * nll

    def validation(self) -> float:
        """The mixed objective (nats per sample) on the fixed validation latents and samples, EMA weights."""
        nll = super().validation()
        kls = []
        for b0 in range(0, self.z_val.shape[0], 256):
            with torch.enable_grad():
                per = self.reverse_kl(self.ema_model, self.z_val[b0:b0 + 256], self.ez_val[b0:b0 + 256],
                                         create_graph=False)
            kls.append(per.detach())
        kl = torch.cat(kls)
        n_bad = self.z_val.shape[0] - kl.numel()
        if kl.numel() == 0:  # no finite energy among the validation samples: the worst score
            kl = torch.full((1,), math.inf, dtype=torch.float64)
        elif n_bad:  # a non-finite sample counts as the worst finite one + 10 nats: weights that send
            # more samples into clashes never score better for having dropped them
            kl = torch.cat([kl, torch.full((n_bad,), float(kl.max()) + 10.0, dtype=kl.dtype)])
        self.last_validation = {"reverse_kl": float(kl.mean()), "nll": nll, "finite": self.z_val.shape[0] - n_bad}
        self.parts_history.append(self.last_validation)
        if self.verbose:
            print(f"reverse KL validation: {self.last_validation}", flush=True)
        return float(self._score(kl.mean(), torch.tensor(nll, dtype=torch.float64)))

    def step(self) -> float:
        """One optimizer step: flow samples for the reverse divergence, a data batch for the likelihood."""
        idx = torch.randint(0, self.y_train.shape[0], (self.batch_size,), generator=self.gen)
        y = self.y_train[idx]
        nll = torch.zeros((), dtype=torch.float32) if self.kl_weight == 1.0 else -continuous_log_likelihood(
            self.velocity, y, self.times, torch.randn(y.shape, generator=self.gen), self.prior_scale).mean()
        z = torch.randn(self.n_samples, y.shape[1], generator=self.gen) * self.prior_scale
        per = self.reverse_kl(self.velocity, z, torch.randn(z.shape, generator=self.gen))
        if per.numel() == 0 and self.kl_weight == 1.0:  # nothing finite to learn from
            self.skipped += 1
            return float("nan")
        loss = self._score(per.mean().float(), nll) if per.numel() else (1.0 - self.kl_weight) * nll
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.velocity.parameters(), 100.0)
        if not torch.isfinite(norm):  # a non-finite energy or density leaked into the gradient: skip
            self.skipped += 1
            return float("nan")
        self.opt.step()
        with torch.no_grad():
            for pe, p in zip(self.ema_model.parameters(), self.velocity.parameters()):
                pe.mul_(self.ema).add_(p.detach(), alpha=1 - self.ema)
        return float(loss.detach())


def fine_tune_reverse_kl(flow, energy: EnergyAndGradient, samples, *, minutes: float, kl_weight: float = 0.5,
                         energy_cap: Optional[float] = None, lr: float = 1e-4, batch_size: int = 128,
                         n_samples: int = 128, ema: float = 0.99, validation_fraction: float = 0.1,
                         val_every: int = 25, seed: int = 0, max_steps: Optional[int] = None,
                         progress: bool = False):
    """Fine-tune a trained flow on the reverse KL divergence mixed with the data's likelihood.

    Parameters
    ----------
    flow : PerturbedFlow
        An unconditioned flow with a :class:`~openmm_flowpert.flow.VelocityMLP` velocity and a plain
        CNF without periodic coordinates (internal coordinates: ``internal``, ``internal-cdf``).
    energy : callable
        x (B, x_dim) (nm for molecules: x_dim = 3N) -> (u (B,) kT, du/dx (B, x_dim) or (B, N, 3)
        kT/nm) at the flow's temperature, NumPy arrays, e.g.
        ``ReducedPotential(system, 300.0).reduced_energies_and_gradients``.
    samples : array (n, N, 3) nm or (n, x_dim)
        Samples of the target (e.g. the flow-matching training frames).
    minutes : float
        Wall-clock budget (> 0); the learning rate decays on a cosine over it (or over ``max_steps``).
    kl_weight : float
        Share of the reverse divergence in the loss, in (0, 1].
    energy_cap : float, optional
        kT above which u grows logarithmically in the loss; default: the samples' median u + 100 kT.
    lr, batch_size, n_samples, ema, validation_fraction, val_every, seed, max_steps
        Adam learning rate, data samples and flow samples per step, EMA decay, held-out fraction,
        steps between validations, seed, step cap.

    Returns
    -------
    PerturbedFlow
        The fine-tuned flow; ``metadata["reverse_kl"]`` records the validation scores (nats per
        sample) before and after, the steps and the wall time.

    Examples
    --------
    >>> rp = ReducedPotential(system, 300.0)                                       # doctest: +SKIP
    >>> tuned = fine_tune_reverse_kl(flow, rp.reduced_energies_and_gradients, frames, minutes=10)  # doctest: +SKIP
    """
    if not minutes > 0:
        raise ValueError(f"reverse-KL fine-tuning: minutes must be positive, got {minutes}")
    if not 0.0 < kl_weight <= 1.0:
        raise ValueError(f"reverse-KL fine-tuning: kl_weight must be in (0, 1], got {kl_weight}")
    if flow.conditioned or flow.info.latent_particles or flow.info.periodic or flow.info.integrator != "rk4":
        raise ValueError("reverse-KL fine-tuning needs an unconditioned RK4 flow on a plain CNF (internal "
                         "coordinates without periodic torsions, or an abstract target; not a mean-free Cartesian "
                         "flow); for a temperature-conditioned flow pass flow.at_temperature(T)")
    started = time.time()
    velocity, transform = flow.parts()
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float64).reshape(len(samples), -1)
    if energy_cap is None:
        pick = np.random.default_rng(seed).choice(len(x), min(len(x), 1000), replace=False)
        u_data = np.asarray(energy(x[np.sort(pick)].numpy())[0])
        if not np.isfinite(u_data).any():
            raise ValueError("reverse-KL fine-tuning: no finite energy among the samples; check that they are "
                             "positions in nm of this system")
        energy_cap = float(np.median(u_data[np.isfinite(u_data)])) + 100.0
    with torch.no_grad():
        y, _ = transform.inverse(x)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(y.shape[0], generator=gen)
    n_val = max(1, int(validation_fraction * y.shape[0]))
    trainer = ReverseKLTrainer(velocity, y[perm[n_val:]].float(), y[perm[:n_val]].float(), flow.info.times, gen,
                               transform=transform, energy=energy, kl_weight=kl_weight, energy_cap=energy_cap,
                               n_samples=n_samples, lr=lr, batch_size=batch_size, ema=ema,
                               prior_scale=flow.prior_scale, val_every=val_every, verbose=progress)
    before, before_parts = trainer.best, dict(trainer.last_validation)
    trainer.fit(minutes, max_steps=max_steps, progress=progress)
    out = flow.rebuilt(trainer.best_velocity())
    out.metadata["reverse_kl"] = {"validation_before": before, "validation_before_parts": before_parts,
                                  "validation_after": trainer.best,
                                  "history": [dict(step=n, score=v, **p) for (n, v), p in
                                              zip(trainer.history, trainer.parts_history)],
                                  "steps": trainer.steps, "skipped_steps": trainer.skipped, "kl_weight": kl_weight,
                                  "energy_cap": energy_cap,
                                  "lr": lr, "batch_size": int(batch_size), "n_samples": int(n_samples), "ema": ema,
                                  "wall_time_s": round(time.time() - started, 1), "seed": int(seed)}
    return out
