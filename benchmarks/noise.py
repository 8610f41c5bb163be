"""Native noise kernels (torch.ops.flowpert, CPU) against the torch fallback.

    python benchmarks/noise.py [--batch 4096] [--dim 1000] [--reps 21] [--threads N]

Prints a markdown table of median wall times over ``--reps`` runs (after two warm-up runs) and the
ratio fallback / native (> 1: native is faster). Needs the native library built
(``pip install --no-build-isolation -e .``).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time

import torch

from openmm_flowpert.noise import _fallback, _native
from _common import cpu_name, timings  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def median_ms(fn, reps: int) -> float:
    return 1e3 * statistics.median(timings(fn, reps, warmup=2))




def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    B, D, reps = args.batch, args.dim, args.reps
    n3 = 3 * (D // 3)  # mean-free variant: the largest 3N <= D
    two_eps = 2e-3
    w = _fallback.gaussian(B, D, 0, 1, 0, 0)
    zp = _fallback.gaussian(B, D, 0, 1, 0, 1)
    zm = zp + 1e-3 * _fallback.gaussian(B, D, 0, 1, 0, 2)
    off = iter(range(10**9))  # fresh offset per call, as Noise does

    def torch_log_stretch():
        return torch.log(torch.linalg.vector_norm(zp - zm, dim=1)) - math.log(two_eps)

    def fallback_directions():
        g = _fallback.gaussian(B, D, 0, 1, 0, next(off))
        r = torch.linalg.vector_norm(g, dim=1)
        return g / r[:, None], r

    rows = [
        # (operation, native call, torch call, torch label)
        (f"gaussian ({B}x{D})", lambda: _native.gaussian(B, D, 0, 1, 0, next(off)),
         lambda: torch.randn(B, D, dtype=torch.float64), "torch.randn"),
        (f"gaussian ({B}x{D})", lambda: _native.gaussian(B, D, 0, 1, 0, next(off)),
         lambda: _fallback.gaussian(B, D, 0, 1, 0, next(off)), "fallback (randn, keyed generator)"),
        (f"gaussian mean-free ({B}x{n3})", lambda: _native.gaussian(B, n3, n3 // 3, 1, 0, next(off)),
         lambda: _fallback.gaussian(B, n3, n3 // 3, 1, 0, next(off)), "fallback"),
        (f"directions ({B}x{D})", lambda: _native.directions(B, D, 0, 1, 0, next(off)),
         fallback_directions, "fallback gaussian + norm"),
    ]
    for K in (2, 100):
        k = torch.full((B,), K, dtype=torch.int64)
        rows.append((f"partial update K={K} ({B}x{D})",
                     (lambda k=k: _native.partial_redraw(w, k, 1, 0, next(off))),
                     (lambda k=k: _fallback.partial_redraw(w, k, 1, 0, next(off))), "fallback (sort-based)"))
    rows.append((f"log_stretch reduction ({B}x{D})", lambda: _native.log_stretch(zp, zm, two_eps),
                 torch_log_stretch, "torch (sub, norm, log)"))

    print(f"# Native noise ops vs torch, {datetime.date.today().isoformat()}\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float64; median of {reps} runs after 2 warm-ups")
    print(f"- library: {_native.LIBRARY}\n")
    print("| operation | native (ms) | torch (ms) | torch variant | torch / native |")
    print("|---|---:|---:|---|---:|")
    for name, nat, ref, label in rows:
        t_nat, t_ref = median_ms(nat, reps), median_ms(ref, reps)
        print(f"| {name} | {t_nat:.2f} | {t_ref:.2f} | {label} | {t_ref / t_nat:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
