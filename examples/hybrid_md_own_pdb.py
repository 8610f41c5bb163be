"""Hybrid MD + flow-perturbation MC for a molecule from your own PDB file.

What it does
------------
1. Builds an OpenMM ``System`` from a PDB file and OpenMM force-field files: vacuum, no cutoff,
   ``constraints=None`` and no periodic box (flow moves refuse constrained or periodic systems).
2. Runs short Langevin MD at the target temperature and keeps frames as training data.
3. Trains a flow on those frames in internal coordinates (``fp.train_flow(x, topology=...)``) and
   saves it (``OUT/flow.pt``: TorchScript + metadata).
4. Samples with openmmtools: an ``MCMCSampler`` whose move is, every iteration, a Langevin MD
   segment followed by a ``FlowPerturbationMove`` (``n_proposals`` flow proposals, and one draw
   among them and the current state in proportion to their generalized-work weights). The
   combination samples the Boltzmann distribution exactly, however good or bad the flow is; a
   better flow only gives more accepted moves.
5. Prints the flow-move acceptance, the move statistics, the mean reduced energy and, for peptides,
   the population of phi < 0 (first residue).

Without ``--pdb`` it uses alanine dipeptide (ACE-ALA-NME, 22 atoms), written to
``OUT/alanine-dipeptide.pdb`` from the package's built-in system, with the amber14 force field.
Plain MD at 300 K stays in the basins it starts in, and so does a flow trained on it: for rare
states, train on replica-exchange data (``flowpert simulate --temperatures 300:600:8``) instead.

Units
-----
Positions in nm, temperature in K, MD time step in fs, friction in 1/ps; energies printed as
reduced potentials u = U / kT (dimensionless, "kT"); angles in rad.

How to run
----------
::

    python examples/hybrid_md_own_pdb.py                        # alanine dipeptide, about 2 minutes on one core
    python examples/hybrid_md_own_pdb.py --pdb my.pdb --forcefield amber14-all.xml implicit/obc2.xml
    python examples/hybrid_md_own_pdb.py --smoke                # every stage at toy size, seconds

The PDB must be complete (hydrogens and caps; pdbfixer adds missing atoms) and without explicit
water. ``--smoke`` numbers are meaningless: it only checks that the pipeline runs.
"""
import argparse
import contextlib
import io
import os
import time

import numpy as np

import openmm_flowpert as fp          # first: imports torch before openmm (openmm-torch needs that)

import openmm
from openmm import app, unit

# openmmtools (imported here and by openmm_flowpert's moves) imports pymbar, which prints an install
# banner and a caution when imported; keep them out of the output. SeededLangevinDynamicsMove is
# openmmtools' LangevinDynamicsMove with a seed (openmmtools' own is unseeded).
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    from openmmtools import cache, mcmc, states

    from openmm_flowpert import FlowPerturbationMove
    from openmm_flowpert.moves.langevin import SeededLangevinDynamicsMove


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pdb", default=None, help="complete PDB file (default: alanine dipeptide)")
    p.add_argument("--forcefield", nargs="+", default=["amber14-all.xml"],
                   help="OpenMM force-field files (vacuum unless you add e.g. implicit/obc2.xml)")
    p.add_argument("--out", default="hybrid-out", help="output folder (PDB, flow.pt)")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--platform", default=None,
                   help="OpenMM platform of the MD (default: Reference below 50 atoms, else CPU; CUDA on a GPU)")
    p.add_argument("--md-frames", type=int, default=20000, help="training frames from plain MD")
    p.add_argument("--md-interval", type=int, default=50, help="MD steps (1 fs) between training frames")
    p.add_argument("--epochs", type=int, default=250, help="flow-matching epochs")
    p.add_argument("--hidden", type=int, default=256, help="width of the flow's velocity network")
    p.add_argument("--flow-steps", type=int, default=20, help="integrator steps of the flow")
    p.add_argument("--iterations", type=int, default=200, help="sampler iterations (MD segment + flow move)")
    p.add_argument("--md-steps", type=int, default=500, help="Langevin steps (1 fs) per iteration")
    p.add_argument("--proposals", type=int, default=16, help="flow proposals per iteration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks that every stage runs (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.md_frames, args.md_interval, args.epochs = 200, 10, 2
        args.hidden, args.flow_steps = 32, 4
        args.iterations, args.md_steps, args.proposals = 3, 10, 4
    return args


def default_pdb(out: str) -> str:
    """Write the package's alanine dipeptide (openmmtools' AlanineDipeptideVacuum) as a PDB file."""
    from openmm_flowpert.systems import alanine_dipeptide

    ala = alanine_dipeptide("vacuum")
    path = os.path.join(out, "alanine-dipeptide.pdb")
    with open(path, "w") as fh:
        app.PDBFile.writeFile(ala.topology, ala.positions * unit.nanometer, fh)
    return path


def build_system(pdb_path: str, forcefield_files):
    """OpenMM System for flow moves: no cutoff, no constraints, no periodic box, no CMM remover."""
    pdb = app.PDBFile(pdb_path)
    forcefield = app.ForceField(*forcefield_files)
    # removeCMMotion=False: the flow removes the centre of mass itself, and the CMMotionRemover
    # would make the MD non-Hamiltonian for nothing.
    system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                     rigidWater=False, removeCMMotion=False)
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    # Fail early, with the fix in the message, if the system cannot be sampled with flow moves.
    from openmm_flowpert.energies import check_system

    check_system(system, n_atoms=len(positions))
    return system, pdb.topology, positions


def run_md(system, positions, temperature, n_frames, interval, seed, platform):
    """Plain Langevin MD (1 fs, friction 1/ps); returns (n_frames, N, 3) positions in nm."""
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 1.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context, maxIterations=200)  # PDB structures can be strained
    context.setVelocitiesToTemperature(temperature * unit.kelvin, seed + 1)
    integrator.step(10 * interval)  # short equilibration
    frames = np.empty((n_frames, len(positions), 3))
    for i in range(n_frames):
        integrator.step(interval)
        frames[i] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return frames


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    pdb_path = args.pdb or default_pdb(args.out)
    system, topology, positions = build_system(pdb_path, args.forcefield)
    # Small molecules run fastest on the Reference platform (the CPU platform's threads cost more
    # than they save below ~50 atoms); openmmtools' moves use its global context cache.
    platform = args.platform or ("Reference" if len(positions) < 50 else "CPU")
    cache.global_context_cache.platform = openmm.Platform.getPlatformByName(platform)
    print(f"system: {pdb_path}, {system.getNumParticles()} atoms, force field {' '.join(args.forcefield)}, "
          f"platform {platform}")

    # -- 1. training data: plain MD ---------------------------------------------------------------
    t0 = time.time()
    frames = run_md(system, positions, args.temperature, args.md_frames, args.md_interval, args.seed, platform)
    print(f"MD training data: {len(frames)} frames, {len(frames) * args.md_interval / 1000:.1f} ps "
          f"({time.time() - t0:.1f} s)")

    # -- 2. flow in internal coordinates ------------------------------------------------------------
    t0 = time.time()
    flow = fp.train_flow(frames, topology=topology, temperature=args.temperature, epochs=args.epochs,
                         hidden=args.hidden, n_steps=args.flow_steps, seed=args.seed, progress=not args.smoke)
    flow_path = os.path.join(args.out, "flow.pt")
    flow.save(flow_path)   # the move is serialized by this path + SHA-256: keep the file
    print(f"flow: {flow.coordinates} coordinates, d = {flow.dim}, saved to {flow_path} "
          f"({time.time() - t0:.1f} s)")

    # -- 3. hybrid MD + flow MC in openmmtools -----------------------------------------------------
    thermodynamic_state = states.ThermodynamicState(system, args.temperature * unit.kelvin)  # NVT
    sampler_state = states.SamplerState(frames[-1] * unit.nanometer)
    # openmmtools' LangevinDynamicsMove is unseeded; SeededLangevinDynamicsMove makes runs reproducible.
    md_move = SeededLangevinDynamicsMove(seed=args.seed, timestep=1.0 * unit.femtosecond,
                                         collision_rate=1.0 / unit.picosecond, n_steps=args.md_steps,
                                         reassign_velocities=False)
    flow_move = FlowPerturbationMove(flow_path, n_proposals=args.proposals, seed=args.seed)  # "fp++" estimator
    sampler = mcmc.MCMCSampler(thermodynamic_state, sampler_state, mcmc.SequenceMove([md_move, flow_move]))

    t0 = time.time()
    xs, us, accepted = [], [], []
    for _ in range(args.iterations):
        before = flow_move.n_accepted
        sampler.run(1)
        xs.append(sampler.sampler_state.positions.value_in_unit(unit.nanometer))
        us.append(thermodynamic_state.reduced_potential(sampler.sampler_state))
        accepted.append(flow_move.n_accepted - before)
    wall = time.time() - t0

    # -- 4. results ---------------------------------------------------------------------------------
    from openmm_flowpert.analysis import backbone_dihedrals, mean_and_se

    st = flow_move.statistics
    print(f"iterations: {args.iterations} x ({args.md_steps} MD steps + {args.proposals} flow proposals), "
          f"{wall:.1f} s")
    print(f"flow-move acceptance: {flow_move.acceptance:.4f} ({st['n_accepted']} / {st['n_proposed']})")
    print(f"iterations with an accepted flow move: {int(np.count_nonzero(accepted))} / {args.iterations}"
          "  (the move's default rule draws once per iteration among the current state and the proposals)")
    print("move statistics: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    t = flow_move.timing   # seconds spent in the move's parts, summed over its calls
    print(f"flow-move time: {t.get('total', 0.0):.1f} s in {int(t.get('calls', 0))} calls "
          f"(refresh {t.get('refresh', 0.0):.1f} s, proposals {t.get('proposals', 0.0):.1f} s, "
          f"energies {t.get('energies', 0.0):.1f} s)")
    m, se, _ = mean_and_se(np.asarray(us))
    print(f"mean reduced energy: {m:.2f} +- {se:.2f} kT")
    try:
        phi, _ = backbone_dihedrals(np.asarray(xs), topology)
        m, se, _ = mean_and_se((phi[:, 0] < 0).astype(float))
        print(f"population phi<0: {100 * m:.1f} +- {100 * se:.1f} %")
    except ValueError:
        pass   # not a peptide: no backbone dihedrals
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
