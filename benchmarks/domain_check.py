"""Cost of FlowPerturbationMove's domain test (one exact inverse per acceptance) on the bundled flow.

Applies the move (16 fp++ proposals) to the same 40 Langevin MD frames of alanine dipeptide at
300 K with ``domain_check`` on and off, alternating the two in each round; prints ms per apply and
the move's counters. Usage: ``OMP_NUM_THREADS=1 python benchmarks/domain_check.py [--rounds 2]``.
"""
import argparse
import time

import openmm_flowpert as fp  # first: torch before openmm

import openmm
from openmm import unit
from openmmtools import cache, states

from openmm_flowpert.simulate import langevin_md
from openmm_flowpert.systems import bundled_flow, get_system


def _time(move, ts, frames, cc) -> float:
    t = time.perf_counter()
    for x in frames:
        move.apply(ts, states.SamplerState(x * unit.nanometer), cc)
    return (time.perf_counter() - t) / len(frames) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--frames", type=int, default=40)
    args = ap.parse_args()
    ms = get_system("alanine-dipeptide")
    frames = langevin_md(ms.system, ms.positions, 300.0, args.frames, steps_per_frame=500, equilibration_steps=5000,
                         seed=1, progress=False)
    ts = states.ThermodynamicState(ms.system, 300 * unit.kelvin)
    cc = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    moves = {on: fp.FlowPerturbationMove(bundled_flow("alanine-dipeptide"), n_proposals=16, seed=7, domain_check=on,
                                         selection="metropolis")
             for on in (True, False)}
    for m in moves.values():  # warm-up (TorchScript, contexts)
        m.apply(ts, states.SamplerState(frames[0] * unit.nanometer), cc)
    print("| round | domain_check | ms / apply | statistics |")
    print("|---|---|---:|---|")
    for r in range(args.rounds):
        for on in (False, True):
            ms_apply = _time(moves[on], ts, frames, cc)
            print(f"| {r + 1} | {on} | {ms_apply:.1f} | {moves[on].statistics} |")


if __name__ == "__main__":
    main()
