"""Temperature replica exchange with flow-perturbation moves in every replica; storage and resume.

What it does
------------
Runs openmmtools' ``ReplicaExchangeSampler`` over a ladder of temperatures. Every iteration, each
replica runs a Langevin MD segment followed by a ``FlowPerturbationMove`` (one flow, trained at
T0, serves all temperatures: ``prior_scale="sqrt(T/T0)"`` widens its latent prior at higher T;
the move is exact for any prior scale), then replicas swap temperatures. Everything is stored in
a netCDF file (``--storage``, default ``rex.nc``). Running the script again with a larger
``--iterations`` resumes from that file (``ReplicaExchangeSampler.from_storage``) and extends the
run (``extend``); a resumed run swaps exactly like an uninterrupted one, because the swap
generators are re-seeded with the iteration number (``openmm_flowpert.moves.seed_replica_exchange``).

At the end it prints, per temperature, the flow-move acceptance, the neighbour swap acceptance,
and, from the stored trajectory at the lowest temperature, the mean reduced energy and the
population of phi < 0.

Default system and flow: alanine dipeptide in vacuum (openmmtools' ``AlanineDipeptideVacuum``,
amber96, ``constraints=None``) with the internal-coordinate flow shipped in the package
(``openmm_flowpert/data/alanine-dipeptide-vacuum-300K.pt``, T0 = 300 K). For your own molecule,
train and save a flow (see ``hybrid_md_own_pdb.py``) and build the same ``System`` here.

Units
-----
Temperatures in K, positions in nm, MD time step in fs; energies are reduced potentials
u = U / kT of the lowest temperature; angles in rad.

How to run
----------
::

    python examples/replica_exchange_flow_moves.py --iterations 100          # 1-2 minutes on one core
    python examples/replica_exchange_flow_moves.py --iterations 200          # resumes, runs 100 more
    mpiexec -n 2 python examples/replica_exchange_flow_moves.py --iterations 100   # replicas over 2 ranks
    python examples/replica_exchange_flow_moves.py --smoke                   # toy sizes, seconds

A resumed run keeps what is stored (temperatures, moves, their seeds and statistics); the options
that define them (``--temperatures``, ``--md-steps``, ``--proposals``, ``--flow``) are then ignored.
Delete the storage file (and ``rex_checkpoint.nc`` next to it) or pass another ``--storage`` to
start over.
"""
import argparse
import contextlib
import io
import os
import time

import numpy as np

import openmm_flowpert as fp          # first: imports torch before openmm (openmm-torch needs that)

import openmm
from openmm import unit

# openmmtools (imported here and by openmm_flowpert's moves) imports pymbar, which prints an install
# banner and a caution when imported; keep them out of the output. SeededLangevinDynamicsMove is
# openmmtools' LangevinDynamicsMove with a seed (openmmtools' own is unseeded).
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    from openmmtools import cache, mcmc, multistate, states

    from openmm_flowpert import FlowPerturbationMove
    from openmm_flowpert.moves import seed_replica_exchange
    from openmm_flowpert.moves.langevin import SeededLangevinDynamicsMove

#: The flow shipped with the package for alanine dipeptide in vacuum at 300 K.
BUNDLED_FLOW = os.path.join(os.path.dirname(fp.__file__), "data", "alanine-dipeptide-vacuum-300K.pt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--flow", default=BUNDLED_FLOW, help="flow file (.pt) trained for the system")
    p.add_argument("--storage", default="rex.nc", help="netCDF storage; resumed from if it exists")
    p.add_argument("--temperatures", default="300,330,363,400", help="comma-separated K, lowest first")
    p.add_argument("--iterations", type=int, default=None,
                   help="total iterations (a resumed run extends up to this); default 100, 2 with --smoke")
    p.add_argument("--md-steps", type=int, default=500, help="Langevin steps (1 fs) per iteration and replica")
    p.add_argument("--proposals", type=int, default=16, help="flow proposals per iteration and replica")
    p.add_argument("--platform", default="Reference",
                   help="OpenMM platform of MD and energies (Reference: fastest for 22 atoms; CPU or CUDA if larger)")
    p.add_argument("--seed", type=int, default=0, help="seeds MD, flow moves and swaps (keep it when resuming)")
    p.add_argument("--smoke", action="store_true", help="toy sizes: 2 temperatures, short segments")
    args = p.parse_args(argv)
    if args.smoke:
        args.temperatures, args.md_steps, args.proposals = "300,330", 10, 2
    if args.iterations is None:
        args.iterations = 2 if args.smoke else 100
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    return args


def build_system():
    """The System the bundled flow was trained for: vacuum, no constraints, no periodic box."""
    from openmm_flowpert.systems import alanine_dipeptide

    ala = alanine_dipeptide("vacuum")
    return ala.system, ala.topology, ala.positions   # positions (22, 3) in nm


def new_sampler(args, system, positions):
    """A fresh ReplicaExchangeSampler writing to ``args.storage``."""
    md_move = SeededLangevinDynamicsMove(seed=args.seed, timestep=1.0 * unit.femtosecond,
                                         collision_rate=1.0 / unit.picosecond, n_steps=args.md_steps,
                                         reassign_velocities=True)
    # Velocities are redrawn at each segment's start (after a swap they belong to the previous
    # temperature) and after every accepted flow move (the Langevin integrator's velocities lag the
    # positions by half a step; carried to new positions they heat the system).
    # One move object; openmmtools copies it for every thermodynamic state. The move is stored in
    # the .nc file by flow path + SHA-256, so the flow file must stay where it is for resuming.
    flow_move = FlowPerturbationMove(args.flow, n_proposals=args.proposals, prior_scale="sqrt(T/T0)",
                                     seed=args.seed)
    thermodynamic_states = [states.ThermodynamicState(system, t * unit.kelvin) for t in args.temperatures]
    sampler_states = [states.SamplerState(positions * unit.nanometer) for _ in args.temperatures]
    sampler = multistate.ReplicaExchangeSampler(mcmc_moves=mcmc.SequenceMove([md_move, flow_move]),
                                                number_of_iterations=args.iterations,
                                                online_analysis_interval=None)  # no MBAR during the run
    reporter = multistate.MultiStateReporter(args.storage, checkpoint_interval=1)  # positions every iteration
    sampler.create(thermodynamic_states=thermodynamic_states, sampler_states=sampler_states, storage=reporter)
    return sampler, reporter


def summarize(storage, topology, move_stats):
    """Read the stored run back: swap acceptance, and observables at the lowest temperature."""
    from openmm_flowpert.analysis import backbone_dihedrals, mean_and_se

    reporter = multistate.MultiStateReporter(storage, open_mode="r")
    thermodynamic_states, _ = reporter.read_thermodynamic_states()
    temperatures = [s.temperature.value_in_unit(unit.kelvin) for s in thermodynamic_states]
    n_iter = reporter.read_last_iteration()
    accepted, proposed = reporter.read_mixing_statistics(slice(1, n_iter + 1))  # per iteration, not cumulative
    accepted, proposed = accepted.sum(0), proposed.sum(0)
    replica_states = reporter.read_replica_thermodynamic_states()                # (n_iter + 1, n_replicas)
    energies = reporter.read_energies()[0]                                       # (n_iter + 1, replica, state)
    xs, us = [], []
    for it in range(1, n_iter + 1):
        r = int(np.flatnonzero(replica_states[it] == 0)[0])                      # replica at the lowest T
        xs.append(reporter.read_sampler_states(it)[r].positions.value_in_unit(unit.nanometer))
        us.append(float(energies[it, r, 0]))
    reporter.close()

    print(f"iterations: {n_iter}")
    for i, t in enumerate(temperatures):
        st = move_stats[i]
        acc = st["n_accepted"] / st["n_proposed"] if st["n_proposed"] else float("nan")
        print(f"  {t:6.1f} K  flow-move acceptance {acc:.4f} ({st['n_accepted']} / {st['n_proposed']})")
    for i in range(len(temperatures) - 1):
        a = accepted[i, i + 1] + accepted[i + 1, i]
        p = proposed[i, i + 1] + proposed[i + 1, i]
        print(f"  swap acceptance {temperatures[i]:.1f} K <-> {temperatures[i + 1]:.1f} K: "
              f"{a / max(p, 1):.3f} ({a} / {p})")
    m, se, _ = mean_and_se(np.asarray(us))
    print(f"at {temperatures[0]:.1f} K: mean reduced energy {m:.2f} +- {se:.2f} kT")
    phi, _ = backbone_dihedrals(np.asarray(xs), topology)
    m, se, _ = mean_and_se((phi[:, 0] < 0).astype(float))
    print(f"at {temperatures[0]:.1f} K: population phi<0 {100 * m:.1f} +- {100 * se:.1f} %")


def main(argv=None):
    args = parse_args(argv)
    system, topology, positions = build_system()
    # openmmtools' samplers take their contexts from the global context cache (MD, swaps' energies).
    cache.global_context_cache.platform = openmm.Platform.getPlatformByName(args.platform)
    import mpiplus

    comm = mpiplus.get_mpicomm()           # None unless run under mpiexec
    root = comm is None or comm.rank == 0

    if os.path.exists(args.storage):
        reporter = multistate.MultiStateReporter(args.storage, open_mode="a", checkpoint_interval=1)
        sampler = multistate.ReplicaExchangeSampler.from_storage(reporter)   # moves, states, statistics
        if root:
            print(f"resumed from {args.storage} at iteration {sampler.iteration}")
    else:
        sampler, reporter = new_sampler(args, system, positions)
        if root:
            print(f"new run: {len(args.temperatures)} replicas at {args.temperatures} K, storage {args.storage}")

    t0 = time.time()
    while sampler.iteration < args.iterations:
        seed_replica_exchange(args.seed, sampler.iteration)   # same swaps as an uninterrupted run
        sampler.extend(1)                                     # MD + flow move in every replica, then swaps
    if root:
        print(f"ran to iteration {sampler.iteration} in {time.time() - t0:.1f} s")

    # Move statistics per thermodynamic state (openmmtools syncs them across MPI ranks).
    # sampler.mcmc_moves[i] is the SequenceMove of thermodynamic state i; [1] is its flow move.
    move_stats = [m.move_list[1].statistics for m in sampler.mcmc_moves]
    reporter.close()
    if root:
        summarize(args.storage, topology, move_stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
