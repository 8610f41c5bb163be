"""Torch threads for FlowPerturbationMove: time per apply of the bundled alanine-dipeptide flow (16
FP++ proposals, the demo's move) after a 500-step Langevin segment on OpenMM's Reference or CPU
platform in the same process, with 1 and 2 torch threads, interleaved so that both see the same load.

usage: python benchmarks/threads.py [--repeats 20] [--platform CPU]
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
    args = p.parse_args()
    mol = alanine_dipeptide("vacuum")
    system, positions = mol.system, mol.positions * unit.nanometer
    flow = fp.PerturbedFlow.load(bundled_flow("alanine-dipeptide"))
    ts = states.ThermodynamicState(system, 300 * unit.kelvin)
    cc = cache.ContextCache(capacity=2, platform=openmm.Platform.getPlatformByName(args.platform))
    md = SeededLangevinDynamicsMove(seed=1, timestep=1 * unit.femtoseconds, n_steps=500, reassign_velocities=False)
    settings = {n: FlowPerturbationMove(flow, n_proposals=args.n_proposals, seed=1, platform=args.platform,
                                        reassign_velocities=False, torch_threads=n) for n in (1, 2)}
    ss = states.SamplerState(positions)
    torch.set_num_threads(2)  # torch's default on 2 cores; the move sets its own during apply
    md_time = {1: [], 2: []}
    for rep in range(args.repeats + 2):
        for n, move in settings.items():
            t0 = time.perf_counter()
            md.apply(ts, ss, cc)
            md_time[n].append(time.perf_counter() - t0)
            if rep == 2:
                move.timing.clear()
            move.apply(ts, ss, cc)
    print(f"alanine dipeptide vacuum, bundled flow, {args.n_proposals} FP++ proposals, OpenMM {args.platform} "
          f"in the same process; {args.repeats} applies each; load {os.getloadavg()[0]:.1f}")
    print("| torch_threads | ms / apply | refresh | proposals | energies | domain | MD (ms) | acceptance |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, move in settings.items():
        t = {k: 1e3 * v / move.timing["calls"] for k, v in move.timing.items() if k != "calls"}
        print(f"| {n} | {t['total']:.0f} | {t.get('refresh', 0):.0f} | {t.get('proposals', 0):.0f} | "
              f"{t.get('energies', 0):.0f} | {t.get('domain', 0):.0f} | {1e3 * np.median(md_time[n][2:]):.0f} | "
              f"{move.acceptance:.3f} |")


if __name__ == "__main__":
    main()
