"""Batches of flow-perturbation Metropolis chains on an energy callable (:func:`run_metropolis`).

The accept test, the state update and the proposals are those of the one core,
:mod:`openmm_flowpert.metropolis`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..metropolis import (EnergyFn, independent_step, initial_state, latent_step, log_weights, metropolis_accept,
                          refreshed_state)
from ..noise import Noise
from ..perturbed_flow import PerturbedFlow

__all__ = ["log_weights", "metropolis_accept", "MetropolisResult", "run_metropolis"]


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
        (docs/algorithm.md section 4), reversible with respect to the Gaussian prior.
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
        state = initial_state(flow, energy, n_chains, noise, **kw)
    else:
        state = refreshed_state(flow, energy, x0, noise, **kw)

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
            acc, log_w_new = independent_step(flow, energy, state, noise, **kw)
        else:
            acc, log_w_new = latent_step(flow, energy, state, noise, 1.0, k, k_eps, **kw)
        n_nonfinite += int((~torch.isfinite(log_w_new)).sum())
        accepted.append(acc)
        energies.append(state.reduced_energy)
        if store_positions:
            traj.append(state.x)
        if observable is not None:
            obs.append(torch.as_tensor(observable(state.x), dtype=torch.float64))
        if bar is not None:
            bar.set_postfix(acceptance=f"{float(torch.stack(accepted).double().mean()):.3f}")
    acc_t = torch.stack(accepted) if accepted else torch.zeros(0, n_chains, dtype=torch.bool)
    return MetropolisResult(
        positions=torch.stack(traj) if store_positions and traj else None,
        reduced_energies=torch.stack(energies) if energies else torch.zeros(0, n_chains),
        accepted=acc_t, n_nonfinite=n_nonfinite,
        observables=torch.stack(obs) if obs else None,
        final={**state.as_dict(), "noise": noise.state()},
    )
