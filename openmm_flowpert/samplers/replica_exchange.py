"""Temperature replica exchange on openmmtools, with or without flow moves: the one implementation.

:func:`run_replica_exchange` builds an openmmtools ``ParallelTemperingSampler`` (one system, a
ladder of temperatures, swap-all mixing, NetCDF storage) whose replicas each apply a seeded
Langevin segment and, when a flow is given, a :class:`~openmm_flowpert.FlowPerturbationMove`.
Storage doubles as the checkpoint: calling it again with the same storage resumes (and refuses a
storage made with other settings). Swaps are seeded per iteration, so a resumed run swaps like an
uninterrupted one. Under ``mpiexec`` openmmtools spreads the replicas over the ranks; rank 0 holds
the storage and gets the result.

Positions are in nm, temperatures in K, times in fs / ps as named, energies reduced (kT).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np

from .._files import require_same_run

__all__ = ["ReplicaExchangeResult", "run_replica_exchange", "read_replica_exchange", "geometric_temperatures",
           "mpi_comm"]

_CONFIG_KEY = "flowpert_config"


def geometric_temperatures(t_min: float, t_max: float, n: int) -> List[float]:
    """``n`` temperatures (K) spaced geometrically from ``t_min`` to ``t_max`` (openmmtools' ladder)."""
    if n < 1:
        raise ValueError(f"a temperature ladder needs at least 1 temperature, got {n}")
    if n == 1:
        return [float(t_min)]
    return [float(t_min * (t_max / t_min) ** (i / (n - 1))) for i in range(n)]


def mpi_comm():
    """The MPI communicator when running under mpiexec (None otherwise; mpi4py is imported only then)."""
    import mpiplus

    return mpiplus.get_mpicomm()


@dataclass
class ReplicaExchangeResult:
    """Frames of a replica-exchange run, by thermodynamic state (temperature), not by replica.

    Attributes
    ----------
    temperatures : list of float
        The ladder, K (the first is the target).
    positions : dict of int -> ndarray (n_frames, N, 3), nm
        Frames of each state that was read (by default only state 0).
    reduced_energies : ndarray (n_states, n_frames)
        u = U / kT of each state's frames at that state's temperature, kT.
    swap_acceptance : ndarray (n_states - 1,)
        Fraction of accepted exchanges between neighbouring temperatures.
    move_statistics : dict
        Counters of the flow move (empty without a flow).
    storage : str
        The NetCDF storage (and checkpoint) file.
    """

    temperatures: List[float]
    positions: dict
    reduced_energies: np.ndarray
    swap_acceptance: np.ndarray
    move_statistics: dict = field(default_factory=dict)
    storage: str = ""


def _config(system, temperatures, flow, md_steps, timestep_fs, friction, n_proposals, estimator, prior_scale,
            seed, selection: str) -> dict:
    from ..perturbed_flow import PerturbedFlow, file_checksum

    flow_id = None
    if flow is not None:
        path = flow.path if isinstance(flow, PerturbedFlow) else os.fspath(flow)
        flow_id = file_checksum(path) if path and os.path.isfile(path) else str(path)
    return {"n_atoms": int(system.getNumParticles()), "temperatures_K": [round(float(t), 6) for t in temperatures],
            "flow_sha256": flow_id, "md_steps": int(md_steps), "timestep_fs": float(timestep_fs),
            "friction_per_ps": float(friction), "n_proposals": int(n_proposals) if flow is not None else 0,
            "estimator": estimator if flow is not None else None,
            "prior_scale": None if flow is None or prior_scale is None else str(prior_scale), "seed": int(seed),
            # newer settings enter only when not the default, so older storage still resumes
            **({"selection": selection} if flow is not None and selection != "metropolis" else {})}


def _check_resume(reporter, storage: str, config: dict) -> None:
    try:
        stored = json.loads(reporter.read_dict(_CONFIG_KEY))
    except Exception:  # a storage written by something else
        stored = {}
    require_same_run(storage, "replica-exchange", config, stored.get("kind"), stored.get("config"))


def _moves(flow, md_steps, timestep_fs, friction, n_proposals, estimator, prior_scale, seed, device,
           selection: str = "weights"):
    from openmm import unit
    from openmmtools import mcmc

    from ..moves import FlowPerturbationMove
    from ..moves.langevin import SeededLangevinDynamicsMove

    # Velocities are redrawn at the state's temperature before every segment: after a swap a replica's
    # velocities belong to its previous temperature, and carrying them heats the cold end of the ladder
    # (alanine dipeptide: <u> at 300 K 1.5-2.1 kT above plain MD; docs/benchmarks.md section 6).
    moves = [SeededLangevinDynamicsMove(seed=seed, timestep=timestep_fs * unit.femtosecond,
                                        collision_rate=friction / unit.picosecond, n_steps=int(md_steps),
                                        reassign_velocities=True)]
    if flow is not None:
        moves.append(FlowPerturbationMove(flow, n_proposals=n_proposals, estimator=estimator, prior_scale=prior_scale,
                                          seed=seed, reassign_velocities=False, device=device, selection=selection))
    return mcmc.SequenceMove(moves)


def _open(storage, system, positions, temperatures, n_iterations, config, moves):
    """A new sampler on ``storage``, or the one stored there (settings checked)."""
    from openmm import unit
    from openmmtools import multistate, states

    if os.path.exists(storage):
        reporter = multistate.MultiStateReporter(storage, open_mode="a", checkpoint_interval=1)
        _check_resume(reporter, storage, config)
        sampler = multistate.ParallelTemperingSampler.from_storage(reporter)
        _reseed_langevin(sampler, config["seed"])
        return sampler, reporter
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    sampler = multistate.ParallelTemperingSampler(mcmc_moves=moves(), number_of_iterations=n_iterations,
                                                  online_analysis_interval=None)
    sampler.create(thermodynamic_state=states.ThermodynamicState(system, temperatures[0] * unit.kelvin),
                   sampler_states=states.SamplerState(np.asarray(positions, dtype=np.float64) * unit.nanometer),
                   storage=reporter, temperatures=[t * unit.kelvin for t in temperatures],
                   n_temperatures=len(temperatures))
    comm = mpi_comm()
    if comm is None or comm.rank == 0:
        reporter.write_dict(_CONFIG_KEY, json.dumps({"kind": "replica-exchange", "config": config}))
    return sampler, reporter


def _reseed_langevin(sampler, seed: int) -> None:
    """A resumed run's Langevin integrators get seed + iteration: a new process builds new contexts,
    and the stored seed would replay the noise of the run's first iterations."""
    from openmmtools import mcmc

    from ..moves.langevin import SeededLangevinDynamicsMove

    for move in sampler._mcmc_moves:  # the sampler's own moves (its public property returns copies)
        for m in move.move_list if isinstance(move, mcmc.SequenceMove) else [move]:
            if isinstance(m, SeededLangevinDynamicsMove):
                m.seed = int(seed) + int(sampler.iteration)


def _flow_move(sampler):
    """The target state's flow move (None without flow moves); the sampler's own object, not the
    deep copy of every replica's moves that ``sampler.mcmc_moves`` returns (read every iteration)."""
    from openmmtools import mcmc

    move = sampler._mcmc_moves[0]
    if isinstance(move, mcmc.SequenceMove) and len(move.move_list) > 1:
        return move.move_list[1]
    return None


def run_replica_exchange(system, positions, temperatures: Sequence[float], n_iterations: int, storage: str, *,
                         flow=None, md_steps: int = 500, timestep_fs: float = 1.0, friction: float = 1.0,
                         n_proposals: int = 16, estimator: str = "fp++",
                         prior_scale: Union[None, float, str] = "sqrt(T/T0)", seed: int = 0,
                         device: Optional[str] = None, platform: Optional[str] = None, discard: int = 0,
                         read_states: Sequence[int] = (0,), progress: bool = True,
                         desc: str = "replica exchange", selection: str = "weights"
                         ) -> Optional[ReplicaExchangeResult]:
    """Run (or resume) temperature replica exchange in openmmtools, with or without flow moves.

    Parameters
    ----------
    system : openmm.System
        Unconstrained and non-periodic when a flow is given (checked by the flow move).
    positions : array (N, 3), nm
        Starting positions of every replica.
    temperatures : sequence of float
        The ladder in K, first the target (see :func:`geometric_temperatures`).
    n_iterations : int
        Iterations in total, resumed ones included; each is an MD segment (and flow move) in every
        replica followed by swap-all exchanges.
    storage : str
        NetCDF file (``.nc``): written every iteration; if it exists the run resumes from it.
    flow : PerturbedFlow or str, optional
        A saved flow (or its file): every replica applies a :class:`~openmm_flowpert.FlowPerturbationMove`
        after its MD segment. None: plain replica exchange.
    md_steps, timestep_fs, friction : int, float, float
        Langevin steps per iteration, their time step (fs) and friction (1/ps).
    n_proposals, estimator, prior_scale, device : flow-move settings
        (:class:`~openmm_flowpert.FlowPerturbationMove`; ``prior_scale`` defaults to ``"sqrt(T/T0)"``).
    selection : {"weights", "metropolis"}
        The flow moves' rule (:class:`~openmm_flowpert.FlowPerturbationMove`): ``"weights"``
        (default) draws each replica's next state once among its current one and the proposals in
        proportion to W, with at most one domain test per apply (docs/benchmarks.md section 5: about
        half the cost of an apply at 16 proposals); ``"metropolis"``, the chain of tests, was the
        default before 2026-12-06 (storage written then resumes with it).
    platform : str, optional
        OpenMM platform of the MD and the exchange energies (default: the energy layer's choice,
        Reference below 50 atoms, GPU platforms first).
    seed : int
        Seeds the Langevin integrators, the flow moves and the swaps.
    discard : int
        Leading iterations left out of the result (equilibration).
    read_states : sequence of int
        Thermodynamic states whose frames are returned (0 = target).
    progress : bool
        tqdm bar (on rank 0).

    Returns
    -------
    ReplicaExchangeResult on rank 0 (or without MPI); None on the other MPI ranks.
    """
    temps = [float(t) for t in temperatures]
    if not temps or any(not t > 0 for t in temps):
        raise ValueError(f"temperatures must be positive (K), got {temps}")
    if int(n_iterations) < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    config = _config(system, temps, flow, md_steps, timestep_fs, friction, n_proposals, estimator, prior_scale, seed,
                     selection)
    sampler, reporter = _open(storage, system, positions, temps, n_iterations, config,
                              lambda: _moves(flow, md_steps, timestep_fs, friction, n_proposals, estimator,
                                             prior_scale, seed, device, selection))
    _set_platform(sampler, system.getNumParticles(), platform)
    comm = mpi_comm()
    root = comm is None or comm.rank == 0
    _advance(sampler, n_iterations, seed, progress and root, desc)
    move = _flow_move(sampler)
    stats = dict(move.statistics) if move is not None else {}
    reporter.close()
    if not root:
        return None
    result = read_replica_exchange(storage, read_states=read_states, discard=discard)
    result.move_statistics = stats
    return result


def _set_platform(sampler, n_atoms: int, platform: Optional[str]) -> None:
    """MD and energies on ``platform``, or on the energy layer's choice (Reference for small
    systems, where it is several times faster than openmmtools' default CPU platform)."""
    import openmm
    from openmmtools import cache

    from ..energies import platform_candidates

    plat = openmm.Platform.getPlatformByName(platform_candidates(n_atoms, platform)[0])
    sampler.energy_context_cache = cache.ContextCache(capacity=None, time_to_live=None, platform=plat)
    sampler.sampler_context_cache = cache.ContextCache(capacity=None, time_to_live=None, platform=plat)


def _advance(sampler, n_iterations: int, seed: int, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    from ..moves.replica_rng import seed_replica_exchange

    with tqdm(total=n_iterations, initial=min(sampler.iteration, n_iterations), desc=desc, unit="it",
              disable=not progress) as bar:
        while sampler.iteration < n_iterations:
            seed_replica_exchange(seed, sampler.iteration)  # resumed runs swap like uninterrupted ones
            sampler.extend(1)
            bar.update(1)
            move = _flow_move(sampler)
            if move is not None:
                st = move.statistics
                bar.set_postfix(acceptance=f"{st['n_accepted'] / max(st['n_proposed'], 1):.3f}")


def read_replica_exchange(storage: str, read_states: Sequence[int] = (0,), discard: int = 0) -> ReplicaExchangeResult:
    """Frames by thermodynamic state from a replica-exchange storage (see :class:`ReplicaExchangeResult`)."""
    from openmm import unit
    from openmmtools import multistate

    rep = multistate.MultiStateReporter(storage, open_mode="r")
    try:
        temps = [float(s.temperature.value_in_unit(unit.kelvin)) for s in rep.read_thermodynamic_states()[0]]
        replica_states = rep.read_replica_thermodynamic_states()  # (n_iter + 1, n_replicas)
        energies = rep.read_energies()[0]                          # (n_iter + 1, n_replicas, n_states), kT
        n_states = len(temps)
        iterations = range(1 + int(discard), replica_states.shape[0])
        positions = {int(k): [] for k in read_states}
        reduced = np.zeros((n_states, len(iterations)))
        for j, it in enumerate(iterations):
            replica_of = np.argsort(replica_states[it])            # replica_of[k]: the replica at state k
            reduced[:, j] = energies[it, replica_of, np.arange(n_states)]
            if positions:
                frames = rep.read_sampler_states(it)
                for k in positions:
                    positions[k].append(frames[replica_of[k]].positions.value_in_unit(unit.nanometer))
        acc, prop = rep.read_mixing_statistics()
        acc, prop = np.asarray(acc).sum(0), np.asarray(prop).sum(0)
    finally:
        rep.close()
    nb = np.array([(acc[i, i + 1] + acc[i + 1, i]) / max(prop[i, i + 1] + prop[i + 1, i], 1)
                   for i in range(n_states - 1)])
    return ReplicaExchangeResult(temps, {k: np.asarray(v).reshape(len(v), -1, 3) for k, v in positions.items()},
                                 reduced, nb, {}, storage)
