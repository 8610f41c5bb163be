"""Exact inverse of the discrete flow map: plain fixed-point iteration against Anderson mixing.

Both variants run the same compiled code in one process (``inverse_memory`` 0 vs the flow's
own depth), on the same positions, so the ratios are measured side by side. Reported per flow:
wall time of ``inverse`` and of an fp++ ``refresh`` (median of repeats, one thread), rows that
failed (NaN), and the round-trip residual max |f(z) - y| in the flow's normalized coordinates.

usage: python benchmarks/inverse.py [FLOW.pt ...] [--frames TRAJ --top PDB] [--batch 32] [--repeats 5]
       (default flow: the bundled alanine-dipeptide flow, inverting its own samples)
"""
import argparse
import statistics

import openmm_flowpert as fp  # noqa: F401  (torch before openmm)
import torch

from openmm_flowpert import Noise, PerturbedFlow
from openmm_flowpert.systems import bundled_flow

from _common import cpu_name, timings


def positions(flow: PerturbedFlow, args) -> torch.Tensor:
    """(B, n_atoms, 3) nm: evenly spaced trajectory frames, or the flow's own samples."""
    if args.frames:
        import mdtraj as md

        t = md.load(args.frames, top=args.top)
        step = max(1, len(t) // args.batch)
        return torch.tensor(t.xyz[::step][:args.batch], dtype=torch.float64)
    return flow.sample(args.batch, seed=1)


def measure(flow: PerturbedFlow, x: torch.Tensor, memory: int, repeats: int) -> dict:
    cnf = flow.module.cnf
    own = cnf.inverse_memory
    cnf.inverse_memory = memory
    try:
        z = flow.inverse(x)
        y, _ = flow.module.transform.inverse(flow._flat(x))
        ok = ~torch.isnan(z).any(1)
        resid = float((cnf(z[ok]) - y[ok]).abs().max()) if bool(ok.any()) else float("nan")
        t_inv = statistics.median(timings(lambda: flow.inverse(x), repeats))
        t_ref = statistics.median(timings(lambda: flow.refresh(x, Noise(5), estimator="fp++"), repeats))
    finally:
        cnf.inverse_memory = own
    return {"inverse_ms": 1e3 * t_inv, "refresh_ms": 1e3 * t_ref, "failed": int((~ok).sum()), "residual": resid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("flows", nargs="*")
    ap.add_argument("--frames", help="trajectory whose frames are inverted (default: the flow's samples)")
    ap.add_argument("--top", help="topology for --frames")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = args.flows or [bundled_flow("alanine-dipeptide")]
    print(f"CPU: {cpu_name()}, 1 thread, batch {args.batch}, positions: {args.frames or 'flow samples'}\n")
    print("| flow | d | steps | inverse | inverse ms | refresh fp++ ms | failed rows | max abs f(z) - y |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        flow = PerturbedFlow.load(path)
        if "inverse_memory" not in flow.metadata:
            flow = flow.rescripted()   # a file from before Anderson mixing: same weights, current code
        x = positions(flow, args)
        depth = flow.module.cnf.inverse_memory
        rows = {m: measure(flow, x, m, args.repeats) for m in (0, depth)}
        for m, r in rows.items():
            name = "plain fixed point" if m == 0 else f"Anderson (depth {m})"
            print(f"| {path.split('/')[-1]} | {flow.d} | {flow.n_steps} | {name} | {r['inverse_ms']:.0f} | "
                  f"{r['refresh_ms']:.0f} | {r['failed']}/{x.shape[0]} | {r['residual']:.1e} |")
        a, b = rows[0], rows[depth]
        print(f"|  |  |  | ratio plain / Anderson | {a['inverse_ms'] / b['inverse_ms']:.2f} | "
              f"{a['refresh_ms'] / b['refresh_ms']:.2f} |  |  |")


if __name__ == "__main__":
    main()
