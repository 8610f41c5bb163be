"""Settings of FlowPerturbationMove side by side: time per apply of the bundled alanine-dipeptide
flow (16 FP++ proposals, the demo's move) after a 500-step Langevin segment on OpenMM's Reference or
CPU platform in the same process. ``--compare threads``: 1 and 2 torch threads; ``--compare
selection``: selection="metropolis" and "weights" (one torch thread); ``--compare inverse``: the
proposals' exact inverse Jacobian solve (the default) against the fast one (``exact_inverse=False``).
The two settings alternate on one sampler state, so they see the same load and the same MD frames.

usage: python benchmarks/threads.py [--repeats 20] [--platform CPU] [--compare selection]
"""
import argparse
import os
import time

import openmm_flowpert as fp
import numpy as np
import openmm
import torch
from openmm import unit
from openmmtools import cache, states

from openmm_flowpert import FlowPerturbationMove
from openmm_flowpert.moves.langevin import SeededLangevinDynamicsMove
from openmm_flowpert.systems import alanine_dipeptide, bundled_flow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--platform", default="Reference")
    p.add_argument("--n-proposals", type=int, default=16)
    p.add_argument("--compare", choices=("threads", "selection", "inverse"), default="threads")
    args = p.parse_args()
    mol = alanine_dipeptide("vacuum")
    system, positions = mol.system, mol.positions * unit.nanometer
    flow = fp.PerturbedFlow.load(bundled_flow("alanine-dipeptide"))
    ts = states.ThermodynamicState(system, 300 * unit.kelvin)
    cc = cache.ContextCache(capacity=2, platform=openmm.Platform.getPlatformByName(args.platform))
    md = SeededLangevinDynamicsMove(seed=1, timestep=1 * unit.femtoseconds, n_steps=500, reassign_velocities=False)
    options = {"threads": {1: dict(torch_threads=1), 2: dict(torch_threads=2)},
               "selection": {"metropolis": dict(selection="metropolis"), "weights": dict(selection="weights")},
               "inverse": {"exact": dict(exact_inverse=True), "fast": dict(exact_inverse=False)}}[args.compare]
    settings = {n: FlowPerturbationMove(flow, n_proposals=args.n_proposals, seed=1, platform=args.platform,
                                        reassign_velocities=False, **kw) for n, kw in options.items()}
    ss = states.SamplerState(positions)
    torch.set_num_threads(2)  # torch's default on 2 cores; the move sets its own during apply
    md_time = {n: [] for n in settings}
    for rep in range(args.repeats + 2):
        for n, move in settings.items():
            t0 = time.perf_counter()
            md.apply(ts, ss, cc)
            md_time[n].append(time.perf_counter() - t0)
            if rep == 2:
                move.timing.clear()
                move.reset_statistics()
            move.apply(ts, ss, cc)
    print(f"alanine dipeptide vacuum, bundled flow, {args.n_proposals} FP++ proposals, OpenMM {args.platform} "
          f"in the same process; {args.repeats} applies each; load {os.getloadavg()[0]:.1f}")
    print(f"| {args.compare} | ms / apply | refresh | proposals | energies | domain | MD (ms) | acceptance "
          "| moved / apply | moves / s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, move in settings.items():
        t = {k: 1e3 * v / move.timing["calls"] for k, v in move.timing.items() if k != "calls"}
        print(f"| {n} | {t['total']:.0f} | {t.get('refresh', 0):.0f} | {t.get('proposals', 0):.0f} | "
              f"{t.get('energies', 0):.0f} | {t.get('domain', 0):.0f} | {1e3 * np.median(md_time[n][2:]):.0f} | "
              f"{move.acceptance:.3f} | {move.n_moved / move.timing['calls']:.3f} | "
              f"{move.n_moved / move.timing['total']:.2f} |")


if __name__ == "__main__":
    main()
