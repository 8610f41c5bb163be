"""Native noise kernels (torch.ops.flowpert, CPU) against the torch fallback.

    python benchmarks/noise.py [--batch 4096] [--dim 1000] [--reps 21] [--threads N]

Prints a markdown table of median wall times over ``--reps`` runs (after two warm-up runs) and the
ratio fallback / native (> 1: native is faster). Needs the native library built
(``pip install --no-build-isolation -e .``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics

import torch

from openmm_flowpert.noise import Noise, _fallback, _native
from _common import cpu_name, timings  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def median_ms(fn, reps: int) -> float:
    return 1e3 * statistics.median(timings(fn, reps, warmup=2))




def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="also time Noise draws on this CUDA device")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    B, D, reps = args.batch, args.dim, args.reps
    n3 = 3 * (D // 3)  # mean-free variant: the largest 3N <= D
    w = _fallback.gaussian(B, D, 0, 1, 0, 0)
    off = iter(range(10**9))  # fresh offset per call, as Noise does

    def fallback_chi():
        return torch.linalg.vector_norm(_fallback.gaussian(B, D, 0, 1, 0, next(off)), dim=1)

    rows = [
        # (operation, native call, torch call, torch label)
        (f"gaussian ({B}x{D})", lambda: _native.gaussian(B, D, 0, 1, 0, next(off)),
         lambda: torch.randn(B, D, dtype=torch.float64), "torch.randn"),
        (f"gaussian ({B}x{D})", lambda: _native.gaussian(B, D, 0, 1, 0, next(off)),
         lambda: _fallback.gaussian(B, D, 0, 1, 0, next(off)), "fallback (randn, keyed generator)"),
        (f"gaussian mean-free ({B}x{n3})", lambda: _native.gaussian(B, n3, n3 // 3, 1, 0, next(off)),
         lambda: _fallback.gaussian(B, n3, n3 // 3, 1, 0, next(off)), "fallback"),
        (f"chi, d={D} ({B} draws; directions op)", lambda: _native.directions(B, D, 0, 1, 0, next(off))[1],
         fallback_chi, "fallback gaussian + norm"),
    ]
    for K in (2, 100):
        k = torch.full((B,), K, dtype=torch.int64)
        rows.append((f"partial update K={K} ({B}x{D})",
                     (lambda k=k: _native.partial_redraw(w, k, 1, 0, next(off))),
                     (lambda k=k: _fallback.partial_redraw(w, k, 1, 0, next(off))), "fallback (sort-based)"))

    print(f"# Native noise ops vs torch, {datetime.date.today().isoformat()}\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float64; median of {reps} runs after 2 warm-ups")
    print(f"- library: {_native.LIBRARY}\n")
    print("| operation | native (ms) | torch (ms) | torch variant | torch / native |")
    print("|---|---:|---:|---|---:|")
    for name, nat, ref, label in rows:
        t_nat, t_ref = median_ms(nat, reps), median_ms(ref, reps)
        print(f"| {name} | {t_nat:.2f} | {t_ref:.2f} | {label} | {t_ref / t_nat:.1f}x |", flush=True)
    if args.device != "cpu":
        device_table(args.device, B, D, n3, reps, w)


def device_table(device: str, B: int, D: int, n3: int, reps: int, w: torch.Tensor) -> None:
    """Noise draws on a CUDA device: the CUDA kernels against CPU kernels + copy (same numbers)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print(f"\n(no table for --device {device}: torch sees no CUDA device)")
        return
    if not _native.has_cuda():
        print("\n(no table for the GPU: the library has no CUDA kernels; rebuild with FLOWPERT_CUDA=1)")
        return
    wd, k = w.to(dev), torch.full((B,), min(100, D), dtype=torch.int64, device=dev)

    def timed(fn):
        def run():
            fn()
            torch.cuda.synchronize(dev)
        return 1e3 * statistics.median(timings(run, reps, warmup=2))

    gpu, cpu = Noise(1, device=dev), Noise(1)
    rows = [(f"gaussian ({B}x{D})", lambda nz, to: to(nz.gaussian(B, D))),
            (f"gaussian mean-free ({B}x{n3})", lambda nz, to: to(nz.gaussian(B, n3, n3 // 3))),
            (f"chi, d={D} ({B} draws)", lambda nz, to: to(nz.chi(B, D))),
            (f"uniform ({B * D})", lambda nz, to: to(nz.uniform(B * D))),
            (f"partial update K={min(100, D)} ({B}x{D})", None)]
    print(f"\n## Noise(device={device!r}): {torch.cuda.get_device_name(dev)}\n")
    print("| operation | CUDA kernels (ms) | CPU + copy (ms) | CPU + copy / CUDA |")
    print("|---|---:|---:|---:|")
    for name, fn in rows:
        if fn is None:
            t_gpu = timed(lambda: gpu.partial_redraw(wd, k))
            t_cpu = timed(lambda: cpu.partial_redraw(w, k.cpu())[0].to(dev))
        else:
            t_gpu = timed(lambda: fn(gpu, lambda x: x))
            t_cpu = timed(lambda: fn(cpu, lambda x: x.to(dev)))
        print(f"| {name} | {t_gpu:.2f} | {t_cpu:.2f} | {t_cpu / t_gpu:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
