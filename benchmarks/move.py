"""Time per FlowPerturbationMove.apply, split into refresh (inverse + auxiliary refresh), proposals
(flow + estimator), energies (OpenMM) and the rest, on alanine dipeptide in vacuum.

usage: python benchmarks/move.py [--repeats 5] [--estimator fp++]
"""
import argparse
import os

import openmm_flowpert as fp  # noqa: F401  (torch before openmm)
import numpy as np
import torch
from openmm import unit
from openmmtools import cache, mcmc, states, testsystems

from openmm_flowpert import FlowPerturbationMove


def training_frames(ala, n=300):
    ts = states.ThermodynamicState(ala.system, 300 * unit.kelvin)
    ss = states.SamplerState(ala.positions)
    md = mcmc.LangevinDynamicsMove(timestep=1 * unit.femtoseconds, n_steps=50)
    cc = cache.ContextCache(capacity=1, platform=__import__("openmm").Platform.getPlatformByName("Reference"))
    out = []
    for _ in range(n):
        md.apply(ts, ss, cc)
        out.append(ss.positions.value_in_unit(unit.nanometer))
    return np.asarray(out)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--estimator", default="fp++")
    p.add_argument("--selection", default="metropolis", choices=("metropolis", "weights"),
                   help="the move's rule (metropolis: the rows of docs/benchmarks.md section 5)")
    args = p.parse_args()
    ala = testsystems.AlanineDipeptideVacuum(constraints=None)
    flow = fp.train_flow(training_frames(ala), epochs=3, hidden=128, n_layers=3, n_steps=20, progress=False,
                         temperature=300.0)
    flow.save("/tmp/flowpert-bench-ala.pt")
    ts = states.ThermodynamicState(ala.system, 300 * unit.kelvin)
    print(f"alanine dipeptide vacuum (22 atoms, d = 63), flow: MLP 128x3, 20 RK4 steps, estimator {args.estimator}, "
          f"exact inverse; torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print()
    print("| platform | n_proposals | ms / apply | refresh | proposals | energies | other | ms / proposal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for platform in ("Reference", "CPU"):
        for n in (1, 16, 64, 256):
            move = FlowPerturbationMove(flow, n_proposals=n, estimator=args.estimator, platform=platform, seed=1,
                                        selection=args.selection)
            cc = cache.ContextCache(capacity=1)
            ss = states.SamplerState(ala.positions)
            for _ in range(3):
                move.apply(ts, ss, cc)
            move.timing.clear()
            for _ in range(args.repeats):
                move.apply(ts, ss, cc)
            t = {k: 1e3 * v / args.repeats for k, v in move.timing.items() if k != "calls"}
            other = t["total"] - t.get("refresh", 0) - t.get("proposals", 0) - t.get("energies", 0)
            print(f"| {platform} | {n} | {t['total']:.1f} | {t.get('refresh', 0):.1f} | {t.get('proposals', 0):.1f} | "
                  f"{t.get('energies', 0):.1f} | {other:.1f} | {t['total'] / n:.2f} |")


if __name__ == "__main__":
    main()
