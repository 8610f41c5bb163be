"""Time per replica-exchange iteration with the flow moves' two selection rules, side by side.

The 8-replica 300-600 K ladder of ``benchmarks/vs_replica_exchange.py`` (alanine dipeptide, vacuum,
bundled flow, 500 Langevin steps and one FlowPerturbationMove per replica and iteration) run with
``run_replica_exchange(..., selection="metropolis")`` and ``selection="weights"``, alternating
within each round so both see the same load. The time includes set-up (contexts, compiled flow),
as a user's short run would.

usage: OMP_NUM_THREADS=1 python benchmarks/replica_selection.py [--iterations 8] [--rounds 2] [--proposals 16]
"""
import argparse
import os
import tempfile
import time

import openmm_flowpert as fp  # noqa: F401  (torch before openmm)
from openmm_flowpert.samplers.replica_exchange import geometric_temperatures, run_replica_exchange
from openmm_flowpert.systems import alanine_dipeptide, bundled_flow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--proposals", type=int, default=16)
    args = p.parse_args()
    ms, flow = alanine_dipeptide("vacuum"), bundled_flow("alanine-dipeptide")
    temps = geometric_temperatures(300.0, 600.0, 8)
    print(f"alanine dipeptide, 8 replicas 300-600 K, bundled flow, {args.proposals} proposals, "
          f"{args.iterations} iterations per run; load {os.getloadavg()[0]:.1f}")
    print("| round | selection | s / iteration | target state: accepted / proposed |")
    print("|---:|---|---:|---:|")
    for rnd in range(args.rounds):
        for sel in ("metropolis", "weights"):
            storage = os.path.join(tempfile.mkdtemp(prefix="flowpert-bench-"), "re.nc")
            t0 = time.perf_counter()
            r = run_replica_exchange(ms.system, ms.positions, temps, args.iterations, storage, flow=flow,
                                     n_proposals=args.proposals, seed=rnd, progress=False, selection=sel)
            dt = (time.perf_counter() - t0) / args.iterations
            s = r.move_statistics
            print(f"| {rnd} | {sel} | {dt:.2f} | {s['n_accepted']} / {s['n_proposed']} |", flush=True)


if __name__ == "__main__":
    main()
