"""One Metropolis core for every flow-perturbation sampler.

The generalized-work test: with log W = -u(x) - log q(x) (u reduced, kT; log q an unbiased-in-W
estimate), a proposal is accepted with probability min(1, W'/W). Non-finite energies or flow
outputs make log W' = -inf: the proposal is rejected, never an exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..noise import Noise
from ..perturbed_flow import PerturbedFlow

__all__ = ["log_weights", "metropolis_accept", "latent_proposal", "MetropolisResult", "run_metropolis"]

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def log_weights(reduced_energy, log_q: torch.Tensor) -> torch.Tensor:
    """log W = -u - log q (nats) per row; NaN or infinite parts give -inf (a certain rejection)."""
    u = torch.as_tensor(np.asarray(reduced_energy, dtype=np.float64)).reshape(log_q.shape)
    lw = -u - log_q
    return torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -float("inf")))


def metropolis_accept(log_w_old: torch.Tensor, log_w_new: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Generalized-work Metropolis decisions: accept where log U < log W' - log W.

    A proposal with log W' = -inf is never accepted; from a state with log W = -inf any finite
    proposal is accepted.
    """
    diff = log_w_new - log_w_old
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, -float("inf")), diff)
    return torch.log(uniform) < diff


@dataclass
class MetropolisResult:
    """Trace of a batch of Metropolis chains.

    Attributes
    ----------
    positions : Tensor or None
        (n_iterations, n_chains, ...) states after each iteration (nm for molecules).
    reduced_energies : Tensor (n_iterations, n_chains)
        u of the state after each iteration (kT).
    accepted : Tensor (n_iterations, n_chains), bool
    n_nonfinite : int
        Proposals rejected because their energy or flow output was not finite.
    observables : Tensor or None
        (n_iterations, n_chains) values of the ``observable`` callable, if given.
    """

    positions: Optional[torch.Tensor]
    reduced_energies: torch.Tensor
    accepted: torch.Tensor
    n_nonfinite: int = 0
    observables: Optional[torch.Tensor] = None
    final: dict = field(default_factory=dict)

    @property
    def acceptance(self) -> float:
        """Fraction of accepted proposals."""
        return float(self.accepted.double().mean())


def _energy(energy: EnergyFn, x: torch.Tensor) -> torch.Tensor:
    u = torch.as_tensor(np.asarray(energy(x), dtype=np.float64)).reshape(x.shape[0])
    return torch.where(torch.isfinite(u), u, torch.full_like(u, float("inf")))


def latent_proposal(flow: PerturbedFlow, w: torch.Tensor, eps: torch.Tensor, noise: Noise, k, k_eps, reference=None,
                    **kw):
    """Latent-local proposal: redraw ``k`` coordinates of each latent w (B, D) and ``k_eps`` of each
    probe vector of eps (B, P, D) from N(0, 1) (reversible w.r.t. the Gaussian prior), then evaluate.

    ``k`` / ``k_eps`` are ints or per-row tensors (B,). Returns (w_new, eps_new, x, log_q).
    """
    B = w.shape[0]
    w_new, _ = noise.partial_redraw(w, k)
    eps_new = eps
    if eps.shape[1] > 0:
        P, D = eps.shape[1], eps.shape[2]
        ke = torch.as_tensor(k_eps).expand(B).repeat_interleave(P) if torch.is_tensor(k_eps) else k_eps
        eps_new = noise.partial_redraw(eps.reshape(B * P, D), ke)[0].reshape(B, P, D)
    x, log_q = flow.evaluate(w_new, eps_new, reference=reference, **kw)
    return w_new, eps_new, x, log_q


def run_metropolis(flow: PerturbedFlow, energy: EnergyFn, n_chains: int, n_iterations: int, *,
                   proposal: str = "independent", estimator: Optional[str] = None, k: int = 2,
                   k_eps: int = 2, x0=None, seed: int = 0, exact_inverse: Optional[bool] = None,
                   prior_scale: Optional[float] = None, store_positions: bool = True,
                   observable: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   progress: bool = False) -> MetropolisResult:
    """Run ``n_chains`` flow-perturbation Metropolis chains in a batch on an energy callable.

    Parameters
    ----------
    flow : PerturbedFlow
    energy : callable
        Maps positions (B, n_atoms, 3) in nm, or (B, D), to reduced potentials u (B,) in kT.
    n_chains, n_iterations : int
    proposal : {"independent", "latent"}
        Independence proposals x' ~ q with fresh directions; or latent-local proposals that redraw
        ``k`` coordinates of the latent and ``k_eps`` coordinates of every probe vector
        (ALGORITHM.md section 4), reversible with respect to the Gaussian prior.
    estimator : str
        ``"fp++"`` (default for independence proposals), ``"fp"`` (default for latent-local),
        ``"jacobian"``, or ``"hutchinson"`` (biased; negative controls only).
    x0 : array, optional
        Starting positions (n_chains, ...); their auxiliary directions are drawn from rho(u | x).
        Default: a first batch of proposals.
    seed : int
        Seed of all noise.
    observable : callable, optional
        Function of positions recorded after every iteration.

    Returns
    -------
    MetropolisResult
    """
    if proposal not in ("independent", "latent"):
        raise ValueError(f"proposal must be 'independent' or 'latent', got {proposal!r}")
    if estimator is None:
        estimator = "fp++" if proposal == "independent" else "fp"
    noise = Noise(seed)
    kw = dict(estimator=estimator, exact_inverse=exact_inverse, prior_scale=prior_scale)
    if x0 is None:
        state = flow.propose(n_chains, noise, **kw)
    else:
        state = flow.refresh(x0, noise, **kw)
    x = state.x
    u = _energy(energy, x)
    log_w = log_weights(u, state.log_q)
    w, eps = state.w, state.eps

    traj, energies, accepted, obs = [], [], [], []
    n_nonfinite = 0
    iterator = range(n_iterations)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(iterator, desc=f"flow MC ({estimator}, {proposal})", unit="it")
        iterator = bar
    for _ in iterator:
        if proposal == "independent":
            prop = flow.propose(n_chains, noise, reference=x, **kw)
            w_new, eps_new = prop.w, prop.eps
        else:
            w_new, eps_new, xp, lq = latent_proposal(flow, w, eps, noise, k, k_eps, reference=x, **kw)
            prop = type(state)(xp, lq, w_new, eps_new)
        u_new = _energy(energy, prop.x)
        log_w_new = log_weights(u_new, prop.log_q)
        n_nonfinite += int((~torch.isfinite(log_w_new)).sum())
        acc = metropolis_accept(log_w, log_w_new, noise.uniform(n_chains))
        sel = acc.view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(sel, prop.x, x)
        u = torch.where(acc, u_new, u)
        log_w = torch.where(acc, log_w_new, log_w)
        w = torch.where(acc.view(-1, 1), w_new, w)
        eps = torch.where(acc.view(-1, 1, 1), eps_new, eps)
        accepted.append(acc)
        energies.append(u)
        if store_positions:
            traj.append(x)
        if observable is not None:
            obs.append(torch.as_tensor(observable(x), dtype=torch.float64))
        if bar is not None:
            bar.set_postfix(acceptance=f"{float(torch.stack(accepted).double().mean()):.3f}")
    acc_t = torch.stack(accepted) if accepted else torch.zeros(0, n_chains, dtype=torch.bool)
    return MetropolisResult(
        positions=torch.stack(traj) if store_positions and traj else None,
        reduced_energies=torch.stack(energies) if energies else torch.zeros(0, n_chains),
        accepted=acc_t, n_nonfinite=n_nonfinite,
        observables=torch.stack(obs) if obs else None,
        final={"x": x, "log_w": log_w, "w": w, "eps": eps, "noise": noise.state()},
    )
