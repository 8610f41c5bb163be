"""fp++ noise against the number of integrator steps, on the bundled alanine-dipeptide flow (or --flow).

    OMP_NUM_THREADS=1 python benchmarks/fpp_steps.py --n 1000 --steps 20,30,40
    OMP_NUM_THREADS=1 python benchmarks/fpp_steps.py --system alanine-tetrapeptide --flow F.pt --steps 20,40,80

For each K: the flow's velocity field re-built on a quadratic grid of K RK4 steps, ``--n`` proposals
from the same latents (noise seed 7) weighed with exact log-dets and with fp++ (reduced energies in
kT, log q in nats). Prints one JSON line per K: Kish ESS of both weightings (%, bootstrap SE), mean
and std of log W(fp++) - log W(exact) (nats), and the cost of one fp++ proposal (ms) at batch 16
and 256. docs/benchmarks.md section 6.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import openmm_flowpert as fp
from openmm_flowpert.energies import ReducedPotential
from openmm_flowpert.flow.cnf import time_grid

sys.path.insert(0, os.path.dirname(__file__))
import alanine  # noqa: E402
from alanine import bootstrap_kish, kish, molecule  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(fp.__file__), "data", "alanine-dipeptide-vacuum-300K.pt")


def log_weights(flow, rp, n: int, batch: int = 250):
    """log W (nats) of n proposals from noise seed 7, with exact log-dets and with fp++ (same latents)."""
    noise = fp.Noise(7)
    exact, fpp = [], []
    for _ in range(0, n, batch):
        w = noise.gaussian(batch, flow.dim)
        eps = noise.gaussian(batch, flow.dim, sets=flow.n_probe_sets("fp++"))
        x, lq_exact = flow.evaluate(w, torch.zeros(batch, 0, flow.dim, dtype=torch.float64), estimator="jacobian")
        _, lq_fpp = flow.evaluate(w, eps, estimator="fp++")
        u = rp(x)
        exact.append(-u - lq_exact.numpy())
        fpp.append(-u - lq_fpp.numpy())
    return np.concatenate(exact), np.concatenate(fpp)


def ms_per_proposal(flow, batch: int, repeats: int = 2) -> float:
    """Wall time of one fp++ proposal (ms) in batches of ``batch``, after one warm-up batch."""
    noise = fp.Noise(1)
    flow.propose(batch, noise)
    t0 = time.perf_counter()
    for _ in range(repeats):
        flow.propose(batch, noise)
    return (time.perf_counter() - t0) / (repeats * batch) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="proposals per K (a multiple of 250)")
    p.add_argument("--steps", default="20,30,40", help="integrator steps K, comma-separated")
    p.add_argument("--flow", default=BUNDLED, help="flow file (default: the bundled alanine-dipeptide flow)")
    p.add_argument("--system", default="alanine-dipeptide", help="built-in system of the flow")
    args = p.parse_args()
    alanine.SYSTEM["name"] = args.system
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rp = ReducedPotential(molecule().system, 300.0)
    base = fp.PerturbedFlow.load(args.flow)
    for K in (int(k) for k in args.steps.split(",")):
        flow = base.rebuilt(times=time_grid(K))
        exact, fpp = log_weights(flow, rp, args.n)
        d = fpp - exact
        print(json.dumps({"K": K, "kish_exact_pct": 100 * kish(exact), "se": 100 * bootstrap_kish(exact),
                          "kish_fpp_pct": 100 * kish(fpp), "se_fpp": 100 * bootstrap_kish(fpp),
                          "dlogw_mean": float(d.mean()), "dlogw_std": float(d.std()),
                          "ms_fpp_b16": ms_per_proposal(flow, 16), "ms_fpp_b256": ms_per_proposal(flow, 256)}),
              flush=True)


if __name__ == "__main__":
    main()
