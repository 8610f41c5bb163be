"""``flowpert sample``: unbiased sampling with hybrid MD + flow-perturbation MC through openmmtools.

One temperature: an MCMC loop (Langevin MD segment, then a FlowPerturbationMove) per iteration.
Several temperatures (``--temperatures``): openmmtools' ReplicaExchangeSampler with the same moves
(run under mpiexec to distribute replicas). Writes to OUT/: trajectory.dcd (+ .pdb topology) of the
target temperature, energies.csv, summary.json and plots. Running the same command again continues
an interrupted run from its checkpoint.
"""
from __future__ import annotations

import argparse
import os

from .simulate import add_system_arguments, parse_temperatures


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="hybrid MD + flow MC (or replica exchange) with a trained flow",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_system_arguments(p)
    p.add_argument("--flow", default=None, help="flow file (.pt); default: the bundled flow of the system, if any")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--temperature", "--temperatures", dest="temperatures", default="300",
                   help="K; a list or LO:HI:N runs replica exchange (first = target)")
    p.add_argument("--iterations", type=int, default=1000, help="iterations (MD segment + flow move)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (single temperature)")
    p.add_argument("--md-steps", type=int, default=500, help="Langevin steps per iteration (1 fs)")
    p.add_argument("--proposals", type=int, default=16, help="flow proposals per iteration")
    p.add_argument("--estimator", default="fp++", choices=["fp++", "fp", "jacobian"])
    p.add_argument("--plain-md", action="store_true", help="no flow moves: plain MD with the same loop")
    p.add_argument("--device", default=None, help="torch device of the flow in the moves (e.g. cuda; default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def bundled_flow(system_name: str):
    """Path of the flow shipped for a built-in system, or None."""
    from ..systems import bundled_flow as _bundled

    return _bundled(system_name)


def run(args) -> int:
    from ..systems import get_system

    temps = parse_temperatures(args.temperatures)
    ms = get_system(args.system, args.forcefield)
    flow = None
    if not args.plain_md:
        flow = args.flow or bundled_flow(args.system)
        if flow is None:
            raise ValueError(f"no --flow given and no bundled flow for {args.system!r}; train one with flowpert train")
    os.makedirs(args.out, exist_ok=True)
    if len(temps) == 1:
        return _single(args, ms, temps[0], flow)
    return _replica_exchange(args, ms, temps, flow)


def _summary_and_plots(args, ms, temperature, positions, energies, accepted, proposed, extra):
    import numpy as np

    from ..analysis import backbone_dihedrals, mean_and_se, phi_populations
    from . import plots
    from ._io import write_json, write_trajectory

    write_trajectory(os.path.join(args.out, "trajectory.dcd"), positions, ms.topology)
    import csv

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["iteration", "reduced_energy_kT", "accepted", "proposed"])
            for i, (u, a, p) in enumerate(zip(energies, accepted, proposed)):
                w.writerow([i + 1, f"{u:.6f}", int(a), int(p)])

    from ._io import _atomic

    _atomic(os.path.join(args.out, "energies.csv"), ".csv", write_csv)
    m, se, g = mean_and_se(energies)
    summary = {"system": ms.name, "temperature_K": temperature, "iterations": len(energies),
               "flow": None if args.plain_md else os.path.abspath(args.flow or bundled_flow(args.system)),
               "acceptance": float(np.sum(accepted) / max(np.sum(proposed), 1)) if np.sum(proposed) else None,
               "n_accepted": int(np.sum(accepted)), "n_proposed": int(np.sum(proposed)),
               "mean_reduced_energy": [m, se], "statistical_inefficiency_energy": g}
    summary.update(extra)
    curves = {"samples": energies}
    if np.sum(proposed):  # what the flow proposes, against what the chain accepted
        import openmm_flowpert as fp

        from ..energies import ReducedPotential

        flow = fp.PerturbedFlow.load(args.flow or bundled_flow(args.system))
        curves = {"flow proposals": ReducedPotential(ms.system, temperature)(flow.sample(500, seed=args.seed)),
                  "samples (MD + accepted flow moves)": energies}
    plots.energy_histograms(os.path.join(args.out, "energies.png"), curves, temperature)
    if np.sum(proposed):
        plots.acceptance_over_time(os.path.join(args.out, "acceptance.png"), accepted, proposed)
    try:
        phi, psi = backbone_dihedrals(positions, ms.topology)
    except ValueError:
        phi = None
    if phi is not None:
        if phi.shape[1] == 1:  # a dipeptide: the populations of its one phi (the demo's observable)
            summary["populations"] = {k: {"mean": v[0], "se": v[1], "g": v[2]}
                                      for k, v in phi_populations(phi).items()}
            label = "this run"
        else:
            label = f"this run ({phi.shape[1]} residues pooled)"
        plots.ramachandran(os.path.join(args.out, "ramachandran.png"), {label: (phi.ravel(), psi.ravel())})
    write_json(os.path.join(args.out, "summary.json"), summary)
    return summary


def _single(args, ms, temperature, flow) -> int:
    from ..samplers import run_hybrid

    res = run_hybrid(ms.system, ms.positions, temperature, flow, n_iterations=args.iterations,
                     seconds=None if args.minutes is None else 60.0 * args.minutes, md_steps=args.md_steps,
                     n_proposals=args.proposals, estimator=args.estimator, seed=args.seed,
                     checkpoint=os.path.join(args.out, "checkpoint.npz"), checkpoint_every=25, progress=True,
                     device=getattr(args, "device", None))
    s = _summary_and_plots(args, ms, temperature, res.positions, res.reduced_energies, res.accepted, res.proposed,
                           {"wall_time_s": float(res.wall_times[-1]) if len(res) else 0.0,
                            "md_steps_per_iteration": args.md_steps})
    _print_summary(s)
    return 0


def mpi_comm():
    """The MPI communicator when running under mpiexec (None otherwise; mpi4py is imported only then)."""
    import mpiplus

    return mpiplus.get_mpicomm()


def _replica_exchange(args, ms, temps, flow) -> int:
    import numpy as np
    from openmm import unit
    from openmmtools import mcmc, multistate, states  # (flowpert's main() has imported pymbar quietly)

    from ..moves import FlowPerturbationMove
    from ..moves.langevin import SeededLangevinDynamicsMove
    from ..moves.replica_rng import seed_replica_exchange

    storage = os.path.join(args.out, "replica_exchange.nc")
    if os.path.exists(storage):
        reporter = multistate.MultiStateReporter(storage, open_mode="a", checkpoint_interval=1)
        sampler = multistate.ReplicaExchangeSampler.from_storage(reporter)
        if sampler.iteration < args.iterations:
            print(f"resuming replica exchange at iteration {sampler.iteration}")
    else:
        moves = [SeededLangevinDynamicsMove(seed=args.seed, timestep=1.0 * unit.femtosecond,
                                            collision_rate=1.0 / unit.picosecond, n_steps=args.md_steps,
                                            reassign_velocities=False)]
        if flow is not None:
            moves.append(FlowPerturbationMove(flow, n_proposals=args.proposals, estimator=args.estimator,
                                              prior_scale="sqrt(T/T0)", seed=args.seed, reassign_velocities=False,
                                              device=getattr(args, "device", None)))
        thermo = [states.ThermodynamicState(ms.system, t * unit.kelvin) for t in temps]
        start = [states.SamplerState(ms.positions * unit.nanometer) for _ in temps]
        sampler = multistate.ReplicaExchangeSampler(mcmc_moves=mcmc.SequenceMove(moves),
                                                    number_of_iterations=args.iterations)
        reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
        sampler.create(thermodynamic_states=thermo, sampler_states=start, storage=reporter)
    from tqdm.auto import tqdm

    comm = mpi_comm()   # under mpiexec openmmtools spreads the replicas over the ranks
    root = comm is None or comm.rank == 0
    with tqdm(total=args.iterations, initial=sampler.iteration, desc="replica exchange", unit="it",
              disable=not root) as bar:
        while sampler.iteration < args.iterations:
            seed_replica_exchange(args.seed, sampler.iteration)  # resumed runs swap like uninterrupted ones
            sampler.extend(1)
            bar.update(1)
            seq = sampler.mcmc_moves[0]
            if isinstance(seq, mcmc.SequenceMove) and len(seq.move_list) > 1:
                st = seq.move_list[1].statistics
                bar.set_postfix(acceptance=f"{st['n_accepted'] / max(st['n_proposed'], 1):.3f}")
    stats = {}
    move = sampler.mcmc_moves[0]
    if isinstance(move, mcmc.SequenceMove) and len(move.move_list) > 1:
        stats = move.move_list[1].statistics
    # (openmmtools syncs the moves' statistics to every rank after each propagation)
    reporter.close()
    if not root:
        return 0   # rank 0 holds the storage and writes the outputs
    rep = multistate.MultiStateReporter(storage, open_mode="r")
    replica_states = rep.read_replica_thermodynamic_states()
    energies_all = rep.read_energies()[0]  # (n_iter + 1, n_replicas, n_states) reduced
    xs, us = [], []
    for it in range(1, replica_states.shape[0]):
        r = int(np.where(replica_states[it] == 0)[0][0])
        xs.append(rep.read_sampler_states(it)[r].positions.value_in_unit(unit.nanometer))
        us.append(float(energies_all[it, r, 0]))
    rep.close()
    n = len(us)
    acc = np.zeros(n, dtype=int)
    prop = np.zeros(n, dtype=int)
    if stats.get("n_proposed"):
        acc[-1], prop[-1] = stats["n_accepted"], stats["n_proposed"]
    s = _summary_and_plots(args, ms, temps[0], np.asarray(xs), np.asarray(us), acc, prop,
                           {"temperatures_K": temps, "move_statistics": stats, "storage": storage})
    _print_summary(s)
    return 0


def _print_summary(s: dict) -> None:
    print(f"{s['system']} at {s['temperature_K']:.1f} K: {s['iterations']} iterations")
    if s.get("acceptance") is not None:
        print(f"  flow-move acceptance  {s['acceptance']:.3f} ({s['n_accepted']} / {s['n_proposed']})")
    m, se = s["mean_reduced_energy"]
    print(f"  mean reduced energy   {m:.2f} +- {se:.2f} kT")
    for k, v in (s.get("populations") or {}).items():
        print(f"  population {k:<12s} {100 * v['mean']:.2f} +- {100 * v['se']:.2f} %")
