"""Population samplers in latent space: many walkers moved together (the papers' protocols).

:class:`LatentMC` runs latent-local Metropolis (docs/algorithm.md section 4) for a batch of walkers at
the target; :class:`FlowPerturbationSMC` anneals the weight exponent b from b0 to 1 with sequential
Monte Carlo (section 7). Both move walkers with the core's latent-local step
(:func:`openmm_flowpert.metropolis.latent_step`): redraw ``k`` coordinates of each latent z and
``k_eps`` of each probe vector (reversible with respect to N(0, I)), then accept with probability
min(1, (W'/W)^b), log W = -u(x) - log q(x) in nats. Energies are reduced (kT);
non-finite ones are rejections. Checkpoints are written atomically and resume bit-for-bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from .._files import load_checkpoint, save_checkpoint
from ..noise import Noise
from ..perturbed_flow import PerturbedFlow
from ..metropolis import ChainState, EnergyFn, initial_state, latent_step, systematic_resample

__all__ = ["LatentMC", "FlowPerturbationSMC", "SMCResult", "sigmoid_schedule"]


class LatentMC:
    """Many walkers doing latent-local flow-perturbation Metropolis at the target (b = 1).

    Parameters
    ----------
    flow : PerturbedFlow
    energy : callable
        Reduced potential u(x) in kT of positions (B, n_atoms, 3) nm or (B, D); e.g. an
        :class:`~openmm_flowpert.energies.ReducedPotential` (batched OpenMM energies).
    n_walkers : int
    k, k_eps : int
        Latent coordinates and probe coordinates redrawn per step.
    estimator : {"fp", "fp++", "jacobian", "hutchinson"}
        ``"fp"`` (default; its noise cancels between correlated states), ``"fp++"``, ``"jacobian"``
        (exact), ``"hutchinson"`` (biased: negative controls).
    n_probes : int
        Probe vectors of ``"hutchinson"``.
    seed : int
    checkpoint : str, optional
        File written (atomically) every ``checkpoint_every`` iterations; :meth:`run` resumes from it.

    Examples
    --------
    >>> mc = LatentMC(flow, gmm.energy, n_walkers=256, seed=0)            # doctest: +SKIP
    >>> trace = mc.run(200, observable=lambda x: (x[:, 0] < 0).double())  # doctest: +SKIP
    """

    def __init__(self, flow: PerturbedFlow, energy: EnergyFn, n_walkers: int = 256, *, k: int = 2, k_eps: int = 2,
                 estimator: str = "fp", n_probes: int = 1, seed: int = 0, exact_inverse: Optional[bool] = None,
                 prior_scale: Optional[float] = None, checkpoint: Optional[str] = None, checkpoint_every: int = 50):
        self.flow, self.energy = flow, energy
        self.n_walkers, self.k, self.k_eps = int(n_walkers), int(k), int(k_eps)
        self.n_probes = int(n_probes)
        self.kw = dict(estimator=estimator, exact_inverse=exact_inverse, prior_scale=prior_scale)
        self.seed = int(seed)
        self.checkpoint, self.checkpoint_every = checkpoint, int(checkpoint_every)
        self.config = {"n_walkers": self.n_walkers, "k": self.k, "k_eps": self.k_eps, "estimator": estimator,
                       "n_probes": self.n_probes, "seed": self.seed}
        self.noise = Noise(self.seed)
        self.state: Optional[ChainState] = None
        self.iteration = 0
        self.acceptance: List[float] = []  #: fraction of walkers accepting, per iteration
        self.observables: List[torch.Tensor] = []
        ck = load_checkpoint(checkpoint, "LatentMC", self.config)
        if ck is not None:
            self.state, self.iteration = ChainState(**ck["state"]), ck["iteration"]
            self.acceptance, self.observables = ck["acceptance"], ck["observables"]
            self.noise = Noise(**ck["noise"])

    def _write(self) -> None:
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, "LatentMC", self.config, {
                "state": self.state.as_dict(), "iteration": self.iteration, "acceptance": self.acceptance,
                "observables": self.observables, "noise": self.noise.state()})

    def run(self, n_iterations: int, observable: Optional[Callable] = None, progress: bool = False) -> torch.Tensor:
        """Advance to ``n_iterations`` iterations in total (resumed ones included).

        Returns the observable trace (iterations, walkers) if ``observable`` is given (else the
        reduced-energy trace is recorded).
        """
        if self.state is None:
            self.state = initial_state(self.flow, self.energy, self.n_walkers, self.noise, self.n_probes, **self.kw)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_iterations, initial=self.iteration, desc="latent MC", unit="it")
        while self.iteration < n_iterations:
            acc, _ = latent_step(self.flow, self.energy, self.state, self.noise, 1.0, self.k, self.k_eps, **self.kw)
            self.iteration += 1
            self.acceptance.append(float(acc.double().mean()))
            obs = observable(self.state.x) if observable is not None else self.state.reduced_energy
            self.observables.append(torch.as_tensor(obs, dtype=torch.float64).clone())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acceptance=f"{np.mean(self.acceptance):.3f}")
            if self.iteration % self.checkpoint_every == 0:
                self._write()
        self._write()
        if bar is not None:
            bar.close()
        return torch.stack(self.observables) if self.observables else torch.zeros(0, self.n_walkers)


def sigmoid_schedule(n_annealing_steps: int, b0: float = 0.0, steepness: float = 6.0) -> np.ndarray:
    """n_annealing_steps + 1 exponents from b0 to 1 along a logistic curve (dense at both ends)."""
    s = 1.0 / (1.0 + np.exp(-np.linspace(-steepness, steepness, n_annealing_steps + 1)))
    return b0 + (1.0 - b0) * (s - s[0]) / (s[-1] - s[0])


def _linear(start: int, end: int, i: int, n: int, upper: int) -> int:
    v = start + (end - start) * (i / max(n - 1, 1))
    return int(min(max(round(v), 1), upper))


@dataclass
class SMCResult:
    """Outcome of :meth:`FlowPerturbationSMC.run`.

    Attributes
    ----------
    x, log_w : final walkers (positions, log W in nats), w and eps their latent states
    weights : Tensor (n_walkers,), normalized importance weights of the final walkers
    log_z : float, estimate of log Z (nats; 0 for a normalized target)
    ess, acceptance, b : per-step traces (ESS as a fraction of the walkers)
    n_resampled : int, number of resampling events
    n_ancestors : int, distinct initial walkers with descendants at the end
    """

    x: torch.Tensor
    log_w: torch.Tensor
    w: torch.Tensor
    eps: torch.Tensor
    weights: torch.Tensor
    log_z: float
    ess: np.ndarray
    acceptance: np.ndarray
    b: np.ndarray
    n_resampled: int
    n_ancestors: int
    wall_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def estimate(self, values) -> float:
        """Weighted average of per-walker values (B,)."""
        v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        return float((self.weights * v).sum())


class FlowPerturbationSMC:
    """Sequential Monte Carlo on the weight exponent (docs/algorithm.md section 7).

    Intermediate targets N(z) N(eps) W^b, b from ``b0`` to 1 on a sigmoid schedule of ``n_annealing_steps``;
    per step: incremental log-weights (b' - b) log W, systematic resampling when the ESS falls below
    ``resample_threshold`` x walkers, then ``sweeps`` latent-local Metropolis sweeps at b' with
    ``k`` latent and ``k_eps`` probe coordinates redrawn; k and k_eps shrink linearly from their first
    to their second value along the run.

    Parameters
    ----------
    flow, energy : as for :class:`LatentMC` (energy in kT).
    n_walkers, n_annealing_steps, b0, sweeps, resample_threshold : protocol (``n_annealing_steps``: SMC steps
        of the exponent b, not integrator or MD steps).
    k, k_eps : (start, end) pairs or ints.
    estimator, n_probes, seed, exact_inverse, prior_scale : as for :class:`LatentMC`.
    checkpoint : str, optional
        Written atomically every ``checkpoint_every`` steps; :meth:`run` resumes from it.
    """

    def __init__(self, flow: PerturbedFlow, energy: EnergyFn, n_walkers: int = 1000, n_annealing_steps: int = 2000, *,
                 b0: float = 0.0, sweeps: int = 2, k: Union[int, Sequence[int]] = (100, 2),
                 k_eps: Union[int, Sequence[int]] = (100, 2), resample_threshold: float = 0.95,
                 estimator: str = "fp", n_probes: int = 1, seed: int = 0, exact_inverse: Optional[bool] = None,
                 prior_scale: Optional[float] = None, checkpoint: Optional[str] = None,
                 checkpoint_every: int = 100):
        if not 0.0 <= b0 < 1.0:
            raise ValueError(f"b0 must lie in [0, 1), got {b0}")
        self.flow, self.energy = flow, energy
        self.n_walkers, self.n_annealing_steps, self.sweeps = int(n_walkers), int(n_annealing_steps), int(sweeps)
        self.k = (int(k), int(k)) if isinstance(k, int) else (int(k[0]), int(k[1]))
        self.k_eps = (int(k_eps), int(k_eps)) if isinstance(k_eps, int) else (int(k_eps[0]), int(k_eps[1]))
        self.threshold = float(resample_threshold)
        self.n_probes = int(n_probes)
        self.kw = dict(estimator=estimator, exact_inverse=exact_inverse, prior_scale=prior_scale)
        self.b = sigmoid_schedule(self.n_annealing_steps, b0)
        self.seed = int(seed)
        self.checkpoint, self.checkpoint_every = checkpoint, int(checkpoint_every)
        self.config = {"n_walkers": self.n_walkers, "n_annealing_steps": self.n_annealing_steps, "b0": float(b0),
                       "sweeps": self.sweeps,
                       "k": list(self.k), "k_eps": list(self.k_eps), "threshold": self.threshold,
                       "estimator": estimator, "n_probes": self.n_probes, "seed": self.seed}

    def run(self, progress: bool = True) -> SMCResult:
        """Run (or resume) the whole schedule; returns :class:`SMCResult`."""
        import time

        t0 = time.perf_counter()
        N, D = self.n_walkers, self.flow.dim
        ck = load_checkpoint(self.checkpoint, "SMC", self.config)
        if ck is not None:
            noise, st, step = Noise(**ck["noise"]), ChainState(**ck["state"]), ck["step"]
            lwn, log_z, anc = ck["lwn"], ck["log_z"], ck["ancestors"]
            ess_t, acc_t, n_res, elapsed = ck["ess"], ck["acceptance"], ck["n_resampled"], ck["elapsed"]
        else:
            noise = Noise(self.seed)
            st = initial_state(self.flow, self.energy, N, noise, self.n_probes, **self.kw)
            step, lwn = 0, torch.full((N,), -math.log(N), dtype=torch.float64)
            log_z, anc = 0.0, torch.arange(N)
            ess_t, acc_t, n_res, elapsed = [], [], 0, 0.0
            if self.b[0] > 0:  # prior draws weighted by W^b0 represent N(z) N(eps) W^b0
                inc = self.b[0] * st.log_w
                log_z = float(torch.logsumexp(lwn + inc, 0))
                lwn = lwn + inc - torch.logsumexp(lwn + inc, 0)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.n_annealing_steps, initial=step, desc=f"SMC ({self.kw['estimator']})",
                       unit="step")
        while step < self.n_annealing_steps:
            b_prev, b_next = self.b[step], self.b[step + 1]
            inc = (b_next - b_prev) * st.log_w
            inc = torch.where(torch.isnan(inc), torch.full_like(inc, -math.inf), inc)
            tot = torch.logsumexp(lwn + inc, 0)
            log_z += float(tot)
            lwn = lwn + inc - tot
            ess = float(1.0 / torch.exp(2 * lwn).sum()) / N
            ess_t.append(ess)
            if ess < self.threshold:
                idx = systematic_resample(torch.exp(lwn), noise.uniform(1))
                st = st.take(idx)
                anc = anc[idx]
                lwn = torch.full((N,), -math.log(N), dtype=torch.float64)
                n_res += 1
            kk = _linear(self.k[0], self.k[1], step, self.n_annealing_steps, D)
            ke = _linear(self.k_eps[0], self.k_eps[1], step, self.n_annealing_steps, D)
            accs = [latent_step(self.flow, self.energy, st, noise, b_next, kk, ke, **self.kw)[0]
                    for _ in range(self.sweeps)]
            acc_t.append(float(torch.stack(accs).double().mean()) if accs else float("nan"))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(b=f"{b_next:.3f}", ess=f"{ess:.2f}", acc=f"{acc_t[-1]:.3f}")
            if self.checkpoint is not None and (step % self.checkpoint_every == 0 or step == self.n_annealing_steps):
                save_checkpoint(self.checkpoint, "SMC", self.config, {
                    "state": st.as_dict(), "step": step, "lwn": lwn, "log_z": log_z, "ancestors": anc, "ess": ess_t,
                    "acceptance": acc_t, "n_resampled": n_res, "elapsed": elapsed + time.perf_counter() - t0,
                    "noise": noise.state()})
        if bar is not None:
            bar.close()
        return SMCResult(x=st.x, log_w=st.log_w, w=st.w, eps=st.eps, weights=torch.exp(lwn),
                         log_z=log_z, ess=np.asarray(ess_t), acceptance=np.asarray(acc_t), b=self.b,
                         n_resampled=n_res, n_ancestors=int(torch.unique(anc).numel()),
                         wall_time_s=elapsed + time.perf_counter() - t0)
