"""`FlowPerturbationMove`: exact flow-perturbation Metropolis as an openmmtools ``MCMCMove``.

Each ``apply`` is self-contained (the move keeps no sampler state between calls): it maps the
current positions to the latent space with the exact inverse, redraws the auxiliary directions
from rho(u | x) (docs/algorithm.md section 4), runs a Metropolis chain over a batch of flow proposals
whose reduced potentials come from OpenMM, and writes the final positions back. Because the
refresh is an exact Gibbs step, the move composes with ``LangevinDynamicsMove``, replica swaps or
any other move that changes x, and the combination samples the Boltzmann distribution exactly.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import zlib
from typing import Callable, Dict, NamedTuple, Optional, Union

import numpy as np
import torch
from openmm import unit
from openmmtools import mcmc

from ..energies import ReducedPotential, check_system
from ..noise import Noise
from ..perturbed_flow import FlowFileError, PerturbedFlow, file_checksum
from ..metropolis import (ChainState, latent_step, log_weights, reduced_energies, selection_probabilities,
                          sequential_chain, weighted_selection)

__all__ = ["FlowPerturbationMove", "load_flow_cached"]

_FLOW_CACHE: Dict[tuple, PerturbedFlow] = {}

#: A proposal is in the chain's domain when the exact inverse of its positions returns its latent
#: point to within this relative tolerance (the inverse itself converges to ~1e-13 per step).
DOMAIN_RTOL = 1e-7


def load_flow_cached(path: str, checksum: Optional[str] = None, device: Optional[str] = None) -> PerturbedFlow:
    """Load a flow file once per process (keyed by absolute path, SHA-256 and torch device).

    Raises :class:`~openmm_flowpert.FlowFileError` if the file is missing, unreadable, or its
    checksum differs from ``checksum`` (the file changed since the move was created or saved).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FlowFileError(f"flow file {path!r} does not exist (it must be readable from every MPI rank "
                            "and at resume time); restore it or point the move at the right path")
    actual = file_checksum(path)
    if checksum is not None and actual != checksum:
        raise FlowFileError(f"flow file {path!r} has changed since the move was created (SHA-256 "
                            f"{actual[:12]}... instead of {checksum[:12]}...); restore the original file")
    key = (path, actual) if device is None else (path, actual, str(device))
    if key not in _FLOW_CACHE:
        flow = PerturbedFlow.load(path)
        _FLOW_CACHE[key] = flow if device is None else flow.to(device)
    return _FLOW_CACHE[key]


class _Candidates(NamedTuple):
    """The points of one ``apply`` with ``selection="weights"`` and the law of its draw among them.

    positions : (n + 1, N, 3) nm (or (n + 1, D)); row 0 the state the apply started from.
    reduced_energies : (n + 1,) kT at the state's temperature.
    probabilities : (n + 1,) the conditional probability of each point being the new state
        (W / sum W; 0 for non-finite weights and for proposals refused by the domain test).
    """

    positions: np.ndarray
    reduced_energies: np.ndarray
    probabilities: np.ndarray


class _Clock:
    """Accumulates wall time of the parts of an ``apply`` into a dict (seconds)."""

    def __init__(self, store: Dict[str, float]):
        self.store, self.t = store, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.store[name] = self.store.get(name, 0.0) + now - self.t
        self.t = now


@contextlib.contextmanager
def _torch_threads(n: Optional[int]):
    """Run the block with ``n`` torch threads (None: unchanged), restoring the previous number."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mpi_rank() -> int:
    try:
        import mpiplus

        comm = mpiplus.get_mpicomm()
        return 0 if comm is None else int(comm.rank)
    except Exception:  # pragma: no cover - mpiplus is a dependency of openmmtools
        return 0


class FlowPerturbationMove(mcmc.MCMCMove):
    """Metropolis moves proposed by a perturbed flow, accepted with the generalized-work test.

    Parameters
    ----------
    flow : PerturbedFlow or str
        The flow, or the path of a flow file. A flow object must have been saved or loaded (it
        is serialized by path and SHA-256 checksum, and loaded once per process). A
        temperature-conditioned flow (``train_flow(..., temperatures=...)``) is used at the
        temperature of each thermodynamic state (:meth:`PerturbedFlow.at_temperature`), so one file
        serves every replica of a temperature ladder.
    n_proposals : int, default 16
        Candidates per ``apply``: one batch for independence proposals (energies evaluated
        together), a sequential chain for latent-local proposals.
    estimator : str, optional
        ``"fp++"`` (default for independence proposals), ``"fp"`` (default for latent-local
        proposals) or ``"jacobian"``. ``"hutchinson"`` is refused: it is biased.
    proposal : {"independent", "latent"}
        Independence proposals from the flow, or latent-local moves that redraw ``k`` latent
        coordinates and ``k_eps`` coordinates of each probe vector.
    selection : {"weights", "metropolis"}, optional
        How independence proposals are used. ``"weights"`` (default for independence proposals):
        one draw among the current state and the proposals with probability W / sum W (a Gibbs
        step on the index, exact, docs/algorithm.md section 4.3); it needs at most one domain test
        per ``apply`` instead of one per acceptance, about half the cost of an ``apply`` at 16
        proposals (docs/benchmarks.md section 5). ``n_accepted`` then counts calls that moved
        (at most one per ``apply``, so accepted / proposed is the fraction of moves per proposal).
        After each ``apply`` the attribute ``candidates`` holds the n + 1 points (positions in nm,
        reduced energies in kT) and the draw's probabilities, for Rao-Blackwellized averages (see
        :func:`~openmm_flowpert.analysis.recycled_mean_and_se`). ``"metropolis"`` (the only rule
        for latent-local proposals, and the default before 2026-12-06): a chain of ``n_proposals``
        Metropolis tests, each against the state the chain holds.
    exact_inverse : bool, optional
        Exact (default) or fast inverse steps in the estimator of the proposals; the map from
        positions to the latent space is always exact.
    prior_scale : float, "sqrt(T/T0)", callable or None
        Latent prior scale s per thermodynamic state: None uses the flow's; a number; the string
        ``"sqrt(T/T0)"`` scales the flow's s by sqrt(T / T0), T0 the flow's training temperature
        (1 for a temperature-conditioned flow, which is at T already);
        or a callable of the temperature in K. Exact for any choice, since p_Z enters W.
    platform : str, optional
        OpenMM platform for the proposal energies (default: CUDA, OpenCL, CPU, Reference).
    n_workers : int, optional
        Worker threads (one private Context each) for the energy batch.
    seed : int, optional
        Seed of all noise (default: drawn from the OS). Each MPI rank uses its own stream.
    device : str, optional
        Torch device of the flow's integration, exact inverse and estimators (e.g. ``"cuda"``;
        default: the CPU). Noise is drawn there too (the same numbers as on the CPU), so results
        depend on the device only through floating-point summation order. A flow object given as
        ``flow`` is moved there.
    domain_check : bool, default True
        Accept a proposal only if the exact inverse of its positions converges back to the latent
        point that made it (:meth:`_in_domain`; one exact inverse per acceptance, about 1.7x the
        cost of an ``apply`` on the bundled flow, docs/benchmarks.md section 5). This keeps the
        move from entering states its refresh cannot weigh and handles steps that are not
        one-to-one (docs/algorithm.md section 4.8). ``False`` is exact only while
        ``n_refresh_failed`` stays 0 and every step is one-to-one.
    torch_threads : int or None, default 1
        Torch threads while the move runs (restored afterwards). The flow's batches are small, and
        with more threads their many small operations stall on thread synchronization whenever
        other work (OpenMM's own threads, another process) shares the cores: measured
        ``benchmarks/threads.py``, docs/benchmarks.md section 5. None leaves torch's setting.
    reassign_velocities : bool, default True
        After an accepted proposal, velocities are redrawn from Maxwell-Boltzmann at the state's
        temperature; this keeps the joint (positions, velocities) distribution exact. Velocities
        that are None are always drawn. ``False`` keeps them, which is exact only if the next move
        redraws them or treats them as full-step velocities independent of x. openmmtools'
        ``LangevinDynamicsMove`` (OpenMM's ``LangevinMiddleIntegrator``) stores velocities half a
        step behind the positions. Those carry -dt/2 F(x)/m of the old positions, so keeping them
        across a jump heats the system at every accepted move (docs/algorithm.md section 4.7).

    Attributes
    ----------
    n_accepted, n_proposed, n_nonfinite, n_refresh_failed, n_outside_domain, n_moved : int
        Accepted and proposed candidates; candidates rejected because their energy or flow output
        was not finite; calls skipped because the exact inverse of the current positions failed
        (positions that MD brought outside the flow's domain: the move leaves them to MD);
        candidates that passed the Metropolis test but were refused because the exact inverse of
        their positions fails or finds another latent point (see :meth:`_in_domain`); calls whose
        final state differs from the state they started from.

    Examples
    --------
    Hybrid MD / flow MC in an openmmtools loop:

    >>> from openmmtools import mcmc                                           # doctest: +SKIP
    >>> move = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=500),
    ...                           FlowPerturbationMove("flow.pt", n_proposals=32)])
    >>> sampler = mcmc.MCMCSampler(thermodynamic_state, sampler_state, move)
    >>> sampler.run(100)
    """

    def __init__(self, flow: Union[PerturbedFlow, str], n_proposals: int = 16, estimator: Optional[str] = None,
                 proposal: str = "independent", k: int = 2, k_eps: int = 2, exact_inverse: Optional[bool] = None,
                 prior_scale: Union[None, float, str, Callable[[float], float]] = None,
                 platform: Optional[str] = None, n_workers: Optional[int] = None, seed: Optional[int] = None,
                 reassign_velocities: bool = True, device: Optional[str] = None, domain_check: bool = True,
                 torch_threads: Optional[int] = 1, selection: Optional[str] = None):
        self.device = None if device is None else str(device)
        if isinstance(flow, PerturbedFlow):
            if self.device is not None:
                flow.to(self.device)
            self.flow_path = flow.path if flow.path and os.path.isfile(flow.path) else None
            self.flow_checksum = file_checksum(flow.path) if self.flow_path else None
            self._flow = flow
            if flow.path:  # later deserializations in this process share this object
                key = (os.path.abspath(flow.path), self.flow_checksum)
                _FLOW_CACHE.setdefault(key if self.device is None else key + (self.device,), flow)
        else:
            self._flow = load_flow_cached(flow, device=self.device)
            self.flow_path = self._flow.path
            self.flow_checksum = file_checksum(self.flow_path)
        self._active = self._flow  # the flow of the state being moved (at_temperature of a conditioned flow)
        if proposal not in ("independent", "latent"):
            raise ValueError(f"proposal must be 'independent' or 'latent', got {proposal!r}")
        estimator = estimator or ("fp++" if proposal == "independent" else "fp")
        if estimator not in ("fp", "fp++", "jacobian"):
            raise ValueError(f"estimator {estimator!r} is not allowed in a move: use 'fp++', 'fp' or 'jacobian' "
                             "(Hutchinson's estimator is biased)")
        selection = selection or ("weights" if proposal == "independent" else "metropolis")
        if selection not in ("metropolis", "weights"):
            raise ValueError(f"selection must be 'weights' or 'metropolis', got {selection!r}")
        if selection == "weights" and proposal != "independent":
            raise ValueError("selection='weights' needs proposal='independent' (latent-local proposals form a chain)")
        if int(n_proposals) < 1:
            raise ValueError(f"n_proposals must be >= 1, got {n_proposals}")
        if isinstance(prior_scale, str) and prior_scale.replace(" ", "") != "sqrt(T/T0)":
            raise ValueError(f"prior_scale string must be 'sqrt(T/T0)', got {prior_scale!r}")
        self.n_proposals = int(n_proposals)
        self.estimator = estimator
        self.proposal = proposal
        self.selection = selection
        self.k, self.k_eps = int(k), int(k_eps)
        self.exact_inverse = exact_inverse
        self.prior_scale = prior_scale
        self.platform = platform
        self.n_workers = n_workers
        self.seed = int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little")
        self.reassign_velocities = bool(reassign_velocities)
        self.domain_check = bool(domain_check)
        if torch_threads is not None and int(torch_threads) < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
        self.torch_threads = None if torch_threads is None else int(torch_threads)
        self._calls = 0
        self.reset_statistics()
        self._energies: Dict[int, ReducedPotential] = {}
        self._validated: set = set()
        self.timing: Dict[str, float] = {}  #: seconds spent in refresh, proposals, energies, total
        self.candidates: Optional[_Candidates] = None  #: the last apply's points and draw law (selection="weights")

    # -- statistics (synchronized across MPI ranks by openmmtools) ---------------------------------
    def reset_statistics(self) -> None:
        """Set all counters to zero."""
        self.n_accepted = 0
        self.n_proposed = 0
        self.n_nonfinite = 0
        self.n_refresh_failed = 0
        self.n_outside_domain = 0
        self.n_moved = 0

    @property
    def statistics(self) -> dict:
        """n_accepted, n_proposed, n_nonfinite, n_refresh_failed, n_outside_domain, n_moved (plain ints)."""
        return {"n_accepted": int(self.n_accepted), "n_proposed": int(self.n_proposed),
                "n_nonfinite": int(self.n_nonfinite), "n_refresh_failed": int(self.n_refresh_failed),
                "n_outside_domain": int(self.n_outside_domain), "n_moved": int(self.n_moved)}

    @statistics.setter
    def statistics(self, value: dict) -> None:
        self.n_accepted = int(value["n_accepted"])
        self.n_proposed = int(value["n_proposed"])
        self.n_nonfinite = int(value.get("n_nonfinite", 0))
        self.n_refresh_failed = int(value.get("n_refresh_failed", 0))
        self.n_outside_domain = int(value.get("n_outside_domain", 0))
        self.n_moved = int(value.get("n_moved", 0))

    @property
    def acceptance(self) -> float:
        """Fraction of accepted proposals so far (NaN before the first)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else float("nan")

    @property
    def flow(self) -> PerturbedFlow:
        return self._flow

    # -- helpers -----------------------------------------------------------------------------------
    def _scale(self, temperature_K: float) -> float:
        base = self._active.prior_scale
        ps = self.prior_scale
        if ps is None:
            return base
        if isinstance(ps, str):
            t0 = self._active.metadata.get("temperature")
            if not t0:
                raise ValueError("prior_scale='sqrt(T/T0)' needs the flow's training temperature T0; train the "
                                 "flow with temperature=... or give prior_scale as a number or callable")
            return base * math.sqrt(temperature_K / float(t0))
        if callable(ps):
            return float(ps(temperature_K))
        return float(ps)

    def _system_key(self, thermodynamic_state) -> int:
        key = getattr(thermodynamic_state, "_standard_system_hash", None)
        return int(key) if key is not None else hash(thermodynamic_state.system.__getstate__())

    def _prepare(self, thermodynamic_state, x: np.ndarray) -> ReducedPotential:
        key = self._system_key(thermodynamic_state)
        if key not in self._validated:
            system = thermodynamic_state.system
            flow = self._flow
            n = system.getNumParticles()
            if flow.n_atoms not in (0, n) or (flow.n_atoms == 0 and flow.dim != 3 * n):
                raise ValueError(f"atom-count/dimension mismatch: the flow has "
                                 f"{flow.n_atoms or flow.dim} {'atoms' if flow.n_atoms else 'coordinates'}, "
                                 f"the system {n} particles ({3 * n} coordinates); use a flow trained for this system")
            check_system(system, translation_invariant_required=flow.remove_com, positions=x,
                         rotation_invariant_required=flow.metadata.get("orientation") == "haar")
            if getattr(thermodynamic_state, "pressure", None) is not None:
                raise ValueError("NPT states are not supported by FlowPerturbationMove; use an NVT state")
            self._energies[key] = ReducedPotential(system, thermodynamic_state.temperature,
                                                   platform=self.platform, n_workers=self.n_workers)
            self._validated.add(key)
        return self._energies[key]

    def _noise(self, x: np.ndarray) -> Noise:
        # Distinct streams per MPI rank and per configuration (replicas share seed and counter after
        # the samplers' deep copies), fresh offsets per call.
        stream = (_mpi_rank() << 24) ^ (zlib.crc32(x.tobytes()) & 0xFFFFFF)
        self._calls += 1
        return Noise(self.seed, stream=stream, offset=self._calls << 20)

    # -- the move ----------------------------------------------------------------------------------
    def apply(self, thermodynamic_state, sampler_state, context_cache=None) -> None:
        """Apply ``n_proposals`` flow-perturbation Metropolis steps to ``sampler_state`` (in place).

        Positions are read and written in nm; the reduced potential u = U/kT of the state
        ``thermodynamic_state`` (its temperature) enters the acceptance test.
        """
        with _torch_threads(self.torch_threads):
            self._apply(thermodynamic_state, sampler_state, context_cache)

    def _apply(self, thermodynamic_state, sampler_state, context_cache) -> None:
        t_start = time.perf_counter()
        x = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        rp = self._prepare(thermodynamic_state, x)
        temperature = thermodynamic_state.temperature.value_in_unit(unit.kelvin)
        self._active = self._flow.at_temperature(temperature)  # a temperature-conditioned flow's flow at T
        noise = self._noise(x)
        kw = dict(estimator=self.estimator, exact_inverse=self.exact_inverse, prior_scale=self._scale(temperature))

        def energy(positions: torch.Tensor) -> np.ndarray:  # nm -> kT at this state's temperature
            return rp(positions, temperature)

        clock = _Clock(self.timing)
        state = self._current_state(x, energy, noise, kw, clock)
        if not bool(torch.isfinite(state.log_w).all()):
            # The exact inverse of the current positions failed (or their energy is not finite): the
            # move cannot weigh the current state, so it leaves it unchanged.
            self.n_refresh_failed += 1
            accepted_any = False
            self.candidates = _Candidates(x[None], state.reduced_energy.reshape(1).numpy(), np.ones(1))
        else:
            accepted_any = self._propose_and_accept(state, energy, noise, kw, clock)
            self.n_proposed += self.n_proposals
            self.n_moved += int(accepted_any)
            x = state.x.reshape(x.shape).numpy()
        self._write_back(thermodynamic_state, sampler_state, context_cache, x, accepted_any, noise)
        self.timing["total"] = self.timing.get("total", 0.0) + time.perf_counter() - t_start
        self.timing["calls"] = self.timing.get("calls", 0) + 1

    def _current_state(self, x: np.ndarray, energy, noise: Noise, kw: dict, clock: _Clock) -> ChainState:
        """The chain at the current positions x (N, 3) nm, its auxiliary directions from rho(u | x)."""
        shape_in = (1, -1) if self._active.n_atoms == 0 else (1,) + x.shape
        cur = self._refresh_auxiliary(torch.from_numpy(x).reshape(shape_in), noise, kw)
        clock.lap("refresh")
        xt = torch.from_numpy(x)[None]
        energy_kT = reduced_energies(energy, xt)
        clock.lap("energies")
        return ChainState(w=cur.w, eps=cur.eps, x=xt, reduced_energy=energy_kT, log_w=log_weights(energy_kT, cur.log_q))

    def _propose_and_accept(self, state: ChainState, energy, noise: Noise, kw: dict, clock: _Clock) -> bool:
        """Run the chain from ``state`` (updated in place) over ``n_proposals`` proposals; True if
        any was accepted."""
        x0 = state.x
        centre = torch.from_numpy(x0[0].numpy().mean(0) if self._active.remove_com else np.zeros(3))

        def place(xp: torch.Tensor) -> torch.Tensor:  # flow output -> positions of this system (nm)
            return xp.reshape(-1, *x0.shape[1:]) + centre

        s = kw["prior_scale"]
        n_accepted = 0
        if self.proposal == "independent":
            prop = self._active.propose(self.n_proposals, noise, reference=x0, **kw)
            clock.lap("proposals")
            xs = place(prop.x)
            u_new = reduced_energies(energy, xs)
            lw_new = log_weights(u_new, prop.log_q)
            clock.lap("energies")
            self.n_nonfinite += int((~torch.isfinite(lw_new)).sum())
            refused = []

            def test(i: int) -> bool:
                ok = bool(self._in_domain(xs[i:i + 1], prop.w[i:i + 1], s))
                if not ok:
                    refused.append(i)
                return ok

            test = test if self.domain_check else None
            if self.selection == "weights":
                best, n_outside = weighted_selection(state.log_w, lw_new, noise.uniform(self.n_proposals + 1), test)
                n_accepted = int(best >= 0)
                self.candidates = _Candidates(torch.cat([x0, xs]).numpy(),
                                              torch.cat([state.reduced_energy.reshape(1), u_new]).numpy(),
                                              selection_probabilities(state.log_w, lw_new, refused).numpy())
            else:
                best, n_accepted, n_outside = sequential_chain(state.log_w, lw_new, noise.uniform(self.n_proposals),
                                                               test)
            self.n_outside_domain += n_outside
            clock.lap("domain")
            if best >= 0:
                state.x, state.log_w = xs[best:best + 1], lw_new[best:best + 1]
        else:
            def in_domain(new: ChainState) -> torch.Tensor:
                ok = self._in_domain(new.x, new.w, s)
                self.n_outside_domain += int((~ok).sum())
                return ok

            for _ in range(self.n_proposals):
                acc, lw_new = latent_step(self._active, energy, state, noise, 1.0, self.k, self.k_eps, place=place,
                                          in_domain=in_domain if self.domain_check else None, **kw)
                clock.lap("proposals")
                self.n_nonfinite += int((~torch.isfinite(lw_new)).sum())
                n_accepted += int(acc.sum())
        self.n_accepted += n_accepted
        return n_accepted > 0

    def _in_domain(self, x: torch.Tensor, w: torch.Tensor, prior_scale: float) -> torch.Tensor:
        """Whether proposals x (B, N, 3) nm, made from latent states w (B, D), lie in the chain's
        domain: the exact inverse that refreshes a current state must converge on x and find the
        latent point z = s P w that produced it (a different preimage means a step that is not
        one-to-one there). Tested only for proposals about to be accepted, so the move never
        enters a state its refresh could not weigh (docs/algorithm.md section 4.8)."""
        z = self._active.latent(w, prior_scale)
        back = self._active.inverse(x.reshape(x.shape[0], -1) if self._active.n_atoms == 0 else x)
        tol = DOMAIN_RTOL * (1.0 + z.abs().amax(1))
        return torch.isfinite(back).all(1) & (self._active.wrap_latent(back - z).abs().amax(1) <= tol)

    def _refresh_auxiliary(self, x: torch.Tensor, noise: Noise, kw: dict):
        """The Gibbs refresh of the auxiliary directions given x, u ~ rho(u | x) (never uniform:
        redrawing u uniformly after an x-move biases the sampler)."""
        return self._active.refresh(x, noise, **kw)

    def _write_back(self, thermodynamic_state, sampler_state, context_cache, x: np.ndarray, accepted_any: bool,
                    noise: Noise) -> None:
        """Positions (nm) into ``sampler_state``; velocities redrawn or kept (see the class)."""
        if not (accepted_any or sampler_state.velocities is None):
            return
        cache = self._get_context_cache(context_cache)
        context, _ = cache.get_context(thermodynamic_state)
        sampler_state.positions = x * unit.nanometer
        sampler_state.apply_to_context(context, ignore_velocities=True)
        if accepted_any and not self.reassign_velocities and sampler_state.velocities is not None:
            sampler_state.apply_to_context(context)
        else:
            context.setVelocitiesToTemperature(thermodynamic_state.temperature,
                                               int(noise.uniform(1)[0] * 2_147_483_000) + 1)
        sampler_state.update_from_context(context)

    # -- copies and serialization ------------------------------------------------------------------
    def __deepcopy__(self, memo):
        # openmmtools deep-copies moves per state and per iteration: share the loaded flow and the
        # energy contexts, copy only the plain settings and counters.
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        memo[id(self)] = new
        return new

    def __getstate__(self) -> dict:
        if not self.flow_path:
            raise ValueError("FlowPerturbationMove can only be serialized with a flow saved to a file: call "
                             "flow.save(path) before creating the move")
        if callable(self.prior_scale) and not isinstance(self.prior_scale, str):
            raise ValueError("a callable prior_scale cannot be serialized; use a number or 'sqrt(T/T0)'")
        return {"flow_path": self.flow_path, "flow_checksum": self.flow_checksum,
                "n_proposals": self.n_proposals, "estimator": self.estimator, "proposal": self.proposal,
                "k": self.k, "k_eps": self.k_eps, "exact_inverse": self.exact_inverse,
                "prior_scale": None if self.prior_scale is None else
                (self.prior_scale if isinstance(self.prior_scale, str) else float(self.prior_scale)),
                "platform": self.platform, "n_workers": self.n_workers, "seed": int(self.seed),
                "reassign_velocities": self.reassign_velocities, "device": self.device,
                "domain_check": self.domain_check, "torch_threads": self.torch_threads, "selection": self.selection,
                "calls": int(self._calls),
                "statistics": self.statistics}

    def __setstate__(self, state: dict) -> None:
        self.device = state.get("device")
        self._flow = load_flow_cached(state["flow_path"], state.get("flow_checksum"), self.device)
        self._active = self._flow
        self.flow_path = state["flow_path"]
        self.flow_checksum = state.get("flow_checksum")
        for name in ("n_proposals", "estimator", "proposal", "k", "k_eps", "exact_inverse", "prior_scale",
                     "platform", "n_workers", "seed", "reassign_velocities"):
            setattr(self, name, state[name])
        self.domain_check = bool(state.get("domain_check", True))
        self.torch_threads = state.get("torch_threads", 1)
        self.selection = state.get("selection", "metropolis")
        self._calls = int(state.get("calls", 0))
        self.statistics = state["statistics"]
        self._energies, self._validated, self.timing, self.candidates = {}, set(), {}, None
