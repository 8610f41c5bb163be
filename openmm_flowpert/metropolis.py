"""The one Metropolis core of every flow-perturbation sampler.

Everything that accepts or rejects lives here: the log-weights, the generalized-work accept test,
the state update of a batch of chains, the latent-local proposal and the sequential chain over a
batch of independent proposals. :class:`~openmm_flowpert.FlowPerturbationMove`,
:func:`~openmm_flowpert.run_metropolis`, :class:`~openmm_flowpert.LatentMC` and
:class:`~openmm_flowpert.FlowPerturbationSMC` differ only in how they propose and how many chains
they carry (docs/algorithm.md, sections 2 and 4).

The test: with log W = -u(x) - log q(x) (u the reduced potential in kT, log q in nats, estimated
unbiasedly in W), a proposal is accepted with probability min(1, (W'/W)^b), b = 1 at the target.
Non-finite energies or flow outputs make log W' = -inf: the proposal is rejected, never an
exception.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .noise import Noise
from .perturbed_flow import PerturbedFlow

__all__ = ["EnergyFn", "DomainFn", "ChainState", "reduced_energies", "log_weights", "metropolis_accept",
           "latent_proposal", "latent_step", "independent_step", "sequential_chain", "weighted_selection",
           "selection_probabilities", "initial_state", "refreshed_state",
           "check_energy_invariance"]

#: A batched reduced potential: positions (B, n_atoms, 3) in nm, or (B, D), to u (B,) in kT.
EnergyFn = Callable[[torch.Tensor], torch.Tensor]
#: Maps a flow's output to the positions the chain stores and the energy sees (default: identity).
PlaceFn = Callable[[torch.Tensor], torch.Tensor]


def reduced_energies(energy: EnergyFn, x: torch.Tensor) -> torch.Tensor:
    """u = energy(x) as float64 (B,) in kT; NaN or infinite energies become +inf (rejections)."""
    e = torch.as_tensor(np.asarray(energy(x), dtype=np.float64)).reshape(x.shape[0])
    return torch.where(torch.isfinite(e), e, torch.full_like(e, float("inf")))


def log_weights(reduced_energy, log_q: torch.Tensor) -> torch.Tensor:
    """log W = -u - log q (nats) per row; NaN or infinite parts give -inf (a certain rejection).

    ``reduced_energy`` is u in kT (array-like, one value per row of ``log_q``).
    """
    e = torch.as_tensor(np.asarray(reduced_energy, dtype=np.float64)).reshape(log_q.shape)
    lw = -e - log_q
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
class ChainState:
    """The state of a batch of B chains, everything the accept test and the next proposal need.

    Attributes
    ----------
    w : Tensor (B, D)
        Unprojected standard-normal latent state (z = s P w).
    eps : Tensor (B, P, D)
        Probe vectors of the estimator (P = 0 for the exact Jacobian).
    x : Tensor (B, n_atoms, 3) in nm, or (B, D)
        Positions.
    reduced_energy : Tensor (B,)
        Reduced potential of x, kT (``u`` in docs/algorithm.md; not the auxiliary direction).
    log_w : Tensor (B,)
        log W = -u - log q, nats.
    """

    w: torch.Tensor
    eps: torch.Tensor
    x: torch.Tensor
    reduced_energy: torch.Tensor
    log_w: torch.Tensor

    def update(self, accepted: torch.Tensor, new: "ChainState") -> None:
        """Take ``new``'s rows where ``accepted`` (B,) is True (in place)."""
        for f in fields(self):
            old = getattr(self, f.name)
            sel = accepted.view(-1, *([1] * (old.dim() - 1)))
            setattr(self, f.name, torch.where(sel, getattr(new, f.name), old))

    def take(self, index: torch.Tensor) -> "ChainState":
        """The chains at ``index`` (resampling)."""
        return ChainState(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def as_dict(self) -> dict:
        """Plain dict of tensors (what checkpoints store)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_energy_invariance(flow: PerturbedFlow, energy: EnergyFn, x: torch.Tensor, rtol: float = 1e-4,
                            atol: float = 1e-3) -> None:
    """Refuse an energy that the flow's geometry would sample wrongly, tested on positions x (nm).

    A mean-free flow places no density on translations and an internal-coordinate flow draws
    orientations uniformly: both are exact only for energies that are translation (and rotation)
    invariant. Compares u at the (up to) 4 lowest-energy rows of x with u after a rigid translation
    (and a rotation) drawn from a fixed generator (the chains' noise is untouched); raises
    ``ValueError`` naming the fix when any differs by more than atol + rtol |u| (kT; the relative
    part allows single-precision platforms).
    """
    if not flow.remove_com or flow.n_atoms == 0:
        return
    from .flow import haar_rotations

    xs = x.reshape(x.shape[0], flow.n_atoms, 3)
    base = reduced_energies(energy, xs)
    rows = torch.argsort(base)[:4]
    rows = rows[torch.isfinite(base[rows])]
    if rows.numel() == 0:
        return
    xs, base = xs[rows], base[rows]
    gen = torch.Generator().manual_seed(12345)
    moves = {"translation": xs + torch.randn(1, 1, 3, generator=gen, dtype=xs.dtype)}
    if flow.metadata.get("orientation") == "haar":
        R = haar_rotations(torch.randn(1, 4, generator=gen, dtype=xs.dtype))[0]
        centre = xs.mean(1, keepdim=True)
        moves["rotation"] = (xs - centre) @ R.T + centre
    for kind, moved in moves.items():
        diff = (reduced_energies(energy, moved) - base).abs()
        if bool((diff > atol + rtol * base.abs()).any()):
            raise ValueError(f"the energy changes under a rigid {kind} (by up to {float(diff.max()):.3g} kT at "
                             f"u = {float(base.min()):.4g} kT), but this flow is "
                             f"{'mean-free' if kind == 'translation' else 'orientation-free'}: it would sample the "
                             "wrong distribution; remove external fields / restraints from the energy, or train a "
                             "flow without remove_com (Cartesian, not internal coordinates)")


def _state(energy: EnergyFn, x: torch.Tensor, log_q: torch.Tensor, w: torch.Tensor, eps: torch.Tensor,
           place: Optional[PlaceFn]) -> ChainState:
    x = x if place is None else place(x)
    energy_kT = reduced_energies(energy, x)
    return ChainState(w=w, eps=eps, x=x, reduced_energy=energy_kT, log_w=log_weights(energy_kT, log_q))


def initial_state(flow: PerturbedFlow, energy: EnergyFn, n: int, noise: Noise, n_probes: int = 1,
                  place: Optional[PlaceFn] = None, **kw) -> ChainState:
    """``n`` chains started from independent flow proposals (``kw``: estimator, prior_scale, ...).

    The energy is checked once for the invariances the flow assumes (:func:`check_energy_invariance`).
    """
    prop = flow.propose(n, noise, n_probes=n_probes, **kw)
    state = _state(energy, prop.x, prop.log_q, prop.w, prop.eps, place)
    check_energy_invariance(flow, energy, state.x)
    return state


def refreshed_state(flow: PerturbedFlow, energy: EnergyFn, x, noise: Noise, place: Optional[PlaceFn] = None,
                    **kw) -> ChainState:
    """Chains at given positions x (nm), their auxiliary directions drawn from rho(u | x).

    This exact Gibbs refresh (docs/algorithm.md section 4) is what lets any x-move (MD, replica
    swaps) precede flow-perturbation Metropolis. Rows whose exact inverse failed get log W = -inf.
    The energy is checked once for the invariances the flow assumes (:func:`check_energy_invariance`).
    """
    cur = flow.refresh(x, noise, **kw)
    state = _state(energy, cur.x, cur.log_q, cur.w, cur.eps, place)
    check_energy_invariance(flow, energy, state.x)
    return state


def latent_proposal(flow: PerturbedFlow, w: torch.Tensor, eps: torch.Tensor, noise: Noise,
                    k: Union[int, torch.Tensor], k_eps: Union[int, torch.Tensor], reference=None,
                    **kw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent-local proposal: redraw ``k`` coordinates of each latent w (B, D) and ``k_eps`` of each
    probe vector of eps (B, P, D) from N(0, 1) (reversible w.r.t. the Gaussian prior), then evaluate.

    ``k`` / ``k_eps`` are ints or per-row tensors (B,). ``reference``: positions (nm) whose
    orientation internal-coordinate proposals take. Returns (w_new, eps_new, x, log_q).
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


#: Tells which proposals (a ChainState of them) lie in the chain's domain: a bool tensor, one per row.
DomainFn = Callable[[ChainState], torch.Tensor]


def _accept_and_update(state: ChainState, new: ChainState, noise: Noise, b: float = 1.0,
                       in_domain: Optional[DomainFn] = None) -> torch.Tensor:
    bb = max(float(b), 1e-12)  # b = 0: every finite proposal is accepted, non-finite ones never
    acc = metropolis_accept(bb * state.log_w, bb * new.log_w, noise.uniform(state.log_w.shape[0]))
    if in_domain is not None and bool(acc.any()):  # only proposals about to be accepted need the test
        rows = acc.nonzero().squeeze(1)
        acc = acc.clone()
        acc[rows] = in_domain(new.take(rows))
    state.update(acc, new)
    return acc


def latent_step(flow: PerturbedFlow, energy: EnergyFn, state: ChainState, noise: Noise, b: float = 1.0,
                k: Union[int, torch.Tensor] = 2, k_eps: Union[int, torch.Tensor] = 2,
                place: Optional[PlaceFn] = None, in_domain: Optional[DomainFn] = None,
                **kw) -> Tuple[torch.Tensor, torch.Tensor]:
    """One latent-local Metropolis step of every chain of ``state`` (updated in place).

    The target of the extended chain is N(w) N(eps) W^b. ``in_domain`` (see
    :func:`sequential_chain`) turns proposals outside the chain's domain into rejections. Returns
    (accepted (B,) bool, log W' of the proposals (B,) in nats, -inf where the energy or the flow
    output was not finite).
    """
    w_new, eps_new, xp, lq = latent_proposal(flow, state.w, state.eps, noise, k, k_eps, reference=state.x, **kw)
    new = _state(energy, xp, lq, w_new, eps_new, place)
    return _accept_and_update(state, new, noise, b, in_domain), new.log_w


def independent_step(flow: PerturbedFlow, energy: EnergyFn, state: ChainState, noise: Noise,
                     place: Optional[PlaceFn] = None, **kw) -> Tuple[torch.Tensor, torch.Tensor]:
    """One independence Metropolis step of every chain (x' ~ q, fresh directions; in place).

    Returns (accepted (B,) bool, log W' of the proposals (B,) in nats).
    """
    prop = flow.propose(state.w.shape[0], noise, reference=state.x, **kw)
    new = _state(energy, prop.x, prop.log_q, prop.w, prop.eps, place)
    return _accept_and_update(state, new, noise), new.log_w


def sequential_chain(log_w: torch.Tensor, log_w_new: torch.Tensor, uniform: torch.Tensor,
                     in_domain: Optional[Callable[[int], bool]] = None) -> Tuple[int, int, int]:
    """One chain through a batch of independence proposals evaluated together.

    ``log_w`` (1,) is the current state's log W, ``log_w_new`` (n,) the proposals', ``uniform``
    (n,) one uniform per proposal. Proposal i is tested against the state the chain holds after
    proposals 0..i-1 (independence Metropolis, so their order is irrelevant to exactness).

    ``in_domain(i)`` is asked only for a proposal that passes the test, and a proposal outside the
    domain is rejected: the chain then samples the target restricted to its domain and never
    enters a state it could not leave (docs/algorithm.md section 4.8). Returns (index of the final
    state, -1 if it is still the initial one; number accepted; number refused as outside the domain).
    """
    current, best, n_accepted, n_outside = log_w, -1, 0, 0
    for i in range(log_w_new.shape[0]):
        if bool(metropolis_accept(current, log_w_new[i:i + 1], uniform[i:i + 1])):
            if in_domain is not None and not in_domain(i):
                n_outside += 1
                continue
            current, best = log_w_new[i:i + 1], i
            n_accepted += 1
    return best, n_accepted, n_outside


def weighted_selection(log_w: torch.Tensor, log_w_new: torch.Tensor, uniform: torch.Tensor,
                       in_domain: Optional[Callable[[int], bool]] = None) -> Tuple[int, int]:
    """One draw among the current state and n independence proposals, with probability W / sum W.

    ``log_w`` (1,) is the current state's log W, ``log_w_new`` (n,) the proposals' (nats), ``uniform``
    (n + 1,) uniforms, one per draw. Given the n + 1 points (one from the extended target, n from
    the proposal law), the index of the target's point has conditional probability proportional to
    W, so this Gibbs draw leaves the extended target invariant (docs/algorithm.md section 4.3). NaN
    or -inf weights are never drawn. ``in_domain(i)`` is asked only for the proposal drawn; one
    outside the domain gets weight 0 and the draw is repeated with the next uniform (which samples
    exactly with weights W 1[domain]). Returns (index of the selected proposal, -1 for the current
    state; number refused as outside the domain).
    """
    lw = torch.cat([log_w.reshape(1), log_w_new]).to(torch.float64)
    lw = torch.where(torch.isnan(lw), torch.full_like(lw, -float("inf")), lw)
    n_outside = 0
    for k in range(uniform.shape[0]):
        if not bool(torch.isfinite(lw).any()):
            return -1, n_outside
        cum = torch.cumsum(torch.exp(lw - lw.max()), 0)
        j = min(int(torch.searchsorted(cum, uniform[k:k + 1].to(cum.dtype) * cum[-1], right=True)), lw.shape[0] - 1)
        if j == 0 or in_domain is None or in_domain(j - 1):
            return j - 1, n_outside
        lw[j] = -float("inf")
        n_outside += 1
    return -1, n_outside


def selection_probabilities(log_w: torch.Tensor, log_w_new: torch.Tensor,
                            refused: Sequence[int] = ()) -> torch.Tensor:
    """The law of :func:`weighted_selection`'s draw given the n + 1 points: W / sum W (n + 1,).

    ``log_w`` (1,) is the current state's log W, ``log_w_new`` (n,) the proposals' (nats);
    ``refused`` lists proposals (0-based, as returned by the draw) known to lie outside the domain.
    Entry 0 is the current state. NaN, -inf and refused entries get probability 0. The mean of an
    observable under this law is the Rao-Blackwellized ("waste-recycling") estimate of one
    ``apply``: at stationarity its expectation is the target's, since the draw has exactly this
    conditional law (docs/algorithm.md section 4.3).
    """
    lw = torch.cat([log_w.reshape(1), log_w_new]).to(torch.float64)
    lw = torch.where(torch.isnan(lw), torch.full_like(lw, -float("inf")), lw)
    for j in refused:
        lw[int(j) + 1] = -float("inf")
    if not bool(torch.isfinite(lw).any()):
        out = torch.zeros_like(lw)
        out[0] = 1.0
        return out
    return torch.softmax(lw, 0)


def systematic_resample(weights: torch.Tensor, u: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """Systematic resampling: ``n`` indices (default: as many as weights) drawn in proportion to
    normalized ``weights`` (N,) with one uniform ``u`` (1,)."""
    N = weights.shape[0]
    n = N if n is None else int(n)
    positions = (u.double() + torch.arange(n, dtype=torch.float64)) / n
    cum = torch.cumsum(weights.double(), 0)
    cum[-1] = 1.0
    return torch.searchsorted(cum, positions).clamp_(max=N - 1)
