"""Cost of the log q estimators relative to one forward flow pass, and exact vs fast inverse.

    python benchmarks/estimators.py [--quick] [--threads N] [--reps R] [--warmup W]

For mean-free flows with d = 66 (23 particles) and d = 498 (167 particles), a randomly
initialized velocity MLP (hidden 256, 3 layers, output layer scaled by 0.3 so the flow is well
conditioned), 20 RK4 steps on the quadratic grid, float64, batch B = 256, this prints

* ms per call of ``module.sample`` (the forward pass) and of ``module.log_q`` for fp and fp++
  (fast and exact inverse), Hutchinson with one probe, and the brute-force jacobian (on a smaller
  batch, reported per sample), with the ratio to the forward pass per sample;
* the targets: fp and fp++ <= 3.5x forward with the fast inverse; jacobian >= d/4 x fp;
* the log W discrepancy |log q(exact) - log q(fast)| for the same z and probes;
* the same discrepancy and the exact/fast cost ratio for a flow trained (``train_flow``) on a
  stiff synthetic molecule (bond-like fluctuations of 0.005 nm next to 0.05 nm ones).

Every timed call is warmed up ``--warmup`` times first (TorchScript's profiling executor
re-optimizes on the first calls of each method/argument combination); the calls of one flow are then
timed round-robin and reported as medians of ``--reps`` runs, in wall-clock and in process CPU
time (with ``--threads 1`` the CPU time is the cost of the call, nearly independent of other jobs).
Thread count and load average are printed: on a shared machine a multi-threaded run can be far
slower than a single-threaded one (OpenMP threads wait for descheduled peers), so compare ratios
within one run, and prefer ``--threads 1`` when the machine is busy.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time

import torch

from openmm_flowpert import PerturbedFlow, train_flow
from openmm_flowpert.flow import VelocityMLP, time_grid
from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

F64 = torch.float64




def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


class Timing:
    """Medians (ms) of wall-clock and process CPU time over the timed runs of one call."""

    def __init__(self, wall: list, cpu: list):
        self.walls, self.cpus = wall, cpu
        self.wall, self.cpu = statistics.median(wall), statistics.median(cpu)


def timed_many(calls: dict, reps: int, warmup: int) -> dict:
    """{name: Timing}: every call warmed up ``warmup`` times, then timed round-robin (one run of
    each per repeat), so that a change of machine load during the measurement affects all of them
    alike. Process CPU time (all threads) is recorded next to wall time: with one thread it is
    what the call costs, nearly independent of other jobs on the machine."""
    walls = {k: [] for k in calls}
    cpus = {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():
            for _ in range(warmup):
                fn()
        for _ in range(reps):
            for k, fn in calls.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                walls[k].append(1e3 * (time.perf_counter() - t0))
                cpus[k].append(1e3 * (time.process_time() - c0))
    return {k: Timing(walls[k], cpus[k]) for k in calls}


def random_flow(n_particles: int, hidden: int, n_layers: int, n_steps: int, seed: int) -> PerturbedFlow:
    torch.manual_seed(seed)
    vel = VelocityMLP(3 * n_particles, hidden=hidden, n_layers=n_layers)
    with torch.no_grad():
        vel.out.weight.mul_(0.3)
        vel.out.bias.mul_(0.3)
    return PerturbedFlow.build(vel, time_grid(n_steps, "quadratic"), n_particles=n_particles)


def inputs(flow: PerturbedFlow, B: int, seed: int) -> tuple:
    """Latent z (B, D) and Gaussian probe sets: one (fp, hutchinson) and n_steps (fp++)."""
    gen = torch.Generator().manual_seed(seed)
    D = flow.dim
    z = flow.latent(torch.randn(B, D, generator=gen, dtype=F64))
    e1 = torch.randn(B, 1, D, generator=gen, dtype=F64)
    ek = torch.randn(B, flow.n_steps, D, generator=gen, dtype=F64)
    return z, e1, ek


def discrepancy(m, z, probes, est: str) -> dict:
    """exact - fast log q for identical z and probes (= -(exact - fast) log W)."""
    with torch.no_grad():
        _, lq_exact = m.log_q(z, probes, est, True, 1.0)
        _, lq_fast = m.log_q(z, probes, est, False, 1.0)
    diff = lq_exact - lq_fast
    ok = torch.isfinite(diff)
    dd = diff[ok]
    return {"n_nan": int((~ok).sum()), "max": float(dd.abs().max()), "rms": float(dd.pow(2).mean().sqrt()),
            "mean": float(dd.mean()), "std": float(dd.std())}


def probe_noise(m, z, probes_a, probes_b, est: str) -> float:
    """Per-sample standard deviation of log q from the probes alone (fast inverse, two probe draws)."""
    with torch.no_grad():
        _, a = m.log_q(z, probes_a, est, False, 1.0)
        _, b = m.log_q(z, probes_b, est, False, 1.0)
    return float((a - b).std() / math.sqrt(2.0))


def discrepancy_table(m, z, probes, probes_b) -> list:
    """Markdown rows: exact-vs-fast |dlog W| and probe noise for fp and fp++ (probes = (fp, fp++) sets)."""
    rows = ["| estimator | max abs(dlog W) | rms | mean | std over batch | exact-inverse NaN rows | probe noise std(log W) (fast) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for est, p, pb in zip(("fp", "fp++"), probes, probes_b):
        r = discrepancy(m, z, p, est)
        pn = probe_noise(m, z, p, pb, est)
        rows.append(f"| {est} | {r['max']:.2e} | {r['rms']:.2e} | {r['mean']:.2e} | {r['std']:.2e} | {r['n_nan']} | {pn:.3f} |")
    return rows


def fmt_times(ts) -> str:
    return ", ".join(f"{t:.0f}" for t in ts)


def bench_random(n_particles: int, B: int, B_jac: int, args, out: list) -> None:
    flow = random_flow(n_particles, 256, 3, 20, seed=n_particles)
    m, d, D = flow.module, flow.d, flow.dim
    z, e1, ek = inputs(flow, B, seed=1)
    calls = {"forward": lambda: m.sample(z)}
    for est, probes in (("fp", e1), ("fp++", ek)):
        for exact in (False, True):
            calls[(est, exact)] = (lambda est=est, probes=probes, exact=exact:
                                   m.log_q(z, probes, est, exact, 1.0))
    calls["hutchinson"] = lambda: m.log_q(z, e1, "hutchinson", False, 1.0)
    t = timed_many(calls, args.reps, args.warmup)
    fwd = t["forward"]
    # rows: (name, inverse, batch, Timing, reference forward Timing at B)
    rows = [("forward (sample)", "-", B, fwd, fwd)]
    for est in ("fp", "fp++"):
        for exact in (False, True):
            rows.append((est, "exact" if exact else "fast", B, t[(est, exact)], fwd))
    rows.append(("hutchinson (N=1)", "-", B, t["hutchinson"], fwd))

    # jacobian: warm up on a batch of one (each call is d vector-Jacobian products per step and
    # sample), then one untimed call each and timed round-robin with the forward pass at B and
    # B_jac; its ratio is to the forward per sample at B timed alongside it.
    zj = z[:B_jac].contiguous()
    with torch.no_grad():
        for _ in range(args.warmup):
            m.log_q(z[:1].contiguous(), torch.zeros(1, 0, D, dtype=F64), "jacobian", False, 1.0)
    nothing = torch.zeros(B_jac, 0, D, dtype=F64)
    tj = timed_many({"jacobian": lambda: m.log_q(zj, nothing, "jacobian", False, 1.0),
                     "forward": lambda: m.sample(z), "forward small": lambda: m.sample(zj)},
                    args.jac_reps, 1)
    rows.append(("jacobian", "-", B_jac, tj["jacobian"], tj["forward"]))
    rows.append(("forward (sample), jacobian's batch", "-", B_jac, tj["forward small"], tj["forward"]))
    rows.append(("forward (sample), timed with the jacobian", "-", B, tj["forward"], tj["forward"]))

    def ratio(tm: Timing, bb: int, ref: Timing, cpu: bool) -> float:
        return (tm.cpu / bb) / (ref.cpu / B) if cpu else (tm.wall / bb) / (ref.wall / B)

    out.append(f"\n### d = {d} (mean-free, {n_particles} particles, D = {D}); B = {B}\n")
    out.append(f"Ratios: cost per sample / forward cost per sample at B = {B} (wall clock; process CPU time).\n")
    out.append("| estimator | inverse | batch | wall ms / call | ratio (wall) | CPU ms / call | ratio (CPU) | wall times of the runs (ms) |")
    out.append("|---|---|---:|---:|---:|---:|---:|---|")
    for name, inv, bb, tm, ref in rows:
        out.append(f"| {name} | {inv} | {bb} | {tm.wall:.1f} | {ratio(tm, bb, ref, False):.2f}x | {tm.cpu:.1f} | "
                   f"{ratio(tm, bb, ref, True):.2f}x | {fmt_times(tm.walls)} |")

    # targets
    out.append("")
    by_cpu = torch.get_num_threads() == 1
    out.append(f"| target | measured (wall) | measured (CPU) | pass (judged on {'CPU' if by_cpu else 'wall'} time) |")
    out.append("|---|---:|---:|---|")
    for est in ("fp", "fp++"):
        rw, rc = ratio(t[(est, False)], B, fwd, False), ratio(t[(est, False)], B, fwd, True)
        out.append(f"| {est} (fast inverse) <= 3.5x forward | {rw:.2f}x | {rc:.2f}x | "
                   f"{'yes' if (rc if by_cpu else rw) <= 3.5 else 'NO'} |")
    jw = ratio(tj["jacobian"], B_jac, tj["forward"], False) / ratio(t[("fp", False)], B, fwd, False)
    jc = ratio(tj["jacobian"], B_jac, tj["forward"], True) / ratio(t[("fp", False)], B, fwd, True)
    jcx = ratio(tj["jacobian"], B_jac, tj["forward"], True) / ratio(t[("fp", True)], B, fwd, True)
    out.append(f"| jacobian >= d/4 = {d / 4:.1f}x fp (fast inverse), per sample | {jw:.1f}x | {jc:.1f}x "
               f"(vs fp exact: {jcx:.1f}x) | {'yes' if (jc if by_cpu else jw) >= d / 4 else 'NO'} |")
    out.append("\nexact / fast cost (CPU): " + ", ".join(
        f"{est} {t[(est, True)].cpu / t[(est, False)].cpu:.2f}x" for est in ("fp", "fp++")))

    # exact vs fast log W
    _, e1b, ekb = inputs(flow, B, seed=2)
    out.append("")
    out.extend(discrepancy_table(m, z, (e1, ek), (e1b, ekb)))


def stiff_samples(n_atoms: int, n_samples: int, seed: int) -> torch.Tensor:
    """A synthetic molecule: a random reference structure (about 1 nm across) with Gaussian
    fluctuations of 0.005 nm on half of the coordinates (bond-like, stiff) and 0.05 nm on the rest."""
    gen = torch.Generator().manual_seed(seed)
    ref = 0.3 * torch.randn(n_atoms, 3, generator=gen, dtype=F64)
    sd = torch.full((n_atoms * 3,), 0.05, dtype=F64)
    stiff = torch.randperm(n_atoms * 3, generator=gen)[: (n_atoms * 3) // 2]
    sd[stiff] = 0.005
    x = ref.reshape(1, -1) + sd * torch.randn(n_samples, n_atoms * 3, generator=gen, dtype=F64)
    return x.reshape(n_samples, n_atoms, 3)


def bench_trained(args, out: list) -> None:
    n_atoms = 22
    t0 = time.perf_counter()
    flow = train_flow(stiff_samples(n_atoms, args.train_samples, seed=3), epochs=args.epochs, hidden=128,
                      n_layers=3, n_steps=20, progress=False, seed=0)
    train_s = time.perf_counter() - t0
    m, B = flow.module, args.batch
    z, e1, ek = inputs(flow, B, seed=4)
    _, e1b, ekb = inputs(flow, B, seed=5)
    info = flow.metadata["training"]
    out.append(f"\n### Trained stiff flow: {n_atoms} atoms (d = {flow.d}), hidden 128, 3 layers, 20 RK4 steps "
               f"(quadratic grid); B = {B}\n")
    out.append(f"Training: {args.train_samples} samples (random structure ~1 nm across; fluctuation std 0.005 nm "
               f"on half of the coordinates, 0.05 nm on the rest), {info['epochs']} epochs, best validation loss "
               f"{info['best_validation_loss']:.4f}, {train_s:.0f} s.\n")
    with torch.no_grad():
        y = flow.module.cnf(z)
        zr = flow.module.cnf.inverse(y, True)
        zf = flow.module.cnf.inverse(y, False)
    out.append(f"Round trip of the CNF part, max |f^-1(f(z)) - z|: exact inverse {float((zr - z).abs().max()):.1e}, "
               f"fast (reverse steps) {float((zf - z).abs().max()):.1e}.\n")
    out.extend(discrepancy_table(m, z, (e1, ek), (e1b, ekb)))
    calls = {"forward": lambda: m.sample(z)}
    for est, probes in (("fp", e1), ("fp++", ek)):
        for exact in (False, True):
            calls[(est, exact)] = (lambda est=est, probes=probes, exact=exact:
                                   m.log_q(z, probes, est, exact, 1.0))
    t = timed_many(calls, args.reps, args.warmup)
    fwd = t["forward"]
    out.append("")
    out.append("| call | wall ms / call | / forward (wall) | CPU ms / call | / forward (CPU) | wall times of the runs (ms) |")
    out.append("|---|---:|---:|---:|---:|---|")
    for key, label in [("forward", "forward (sample)")] + [((e, x), f"{e}, {'exact' if x else 'fast'} inverse")
                                                         for e in ("fp", "fp++") for x in (False, True)]:
        tm = t[key]
        out.append(f"| {label} | {tm.wall:.1f} | {tm.wall / fwd.wall:.2f}x | {tm.cpu:.1f} | {tm.cpu / fwd.cpu:.2f}x | "
                   f"{fmt_times(tm.walls)} |")
    out.append("\nexact / fast cost (CPU): " + ", ".join(
        f"{est} {t[(est, True)].cpu / t[(est, False)].cpu:.2f}x" for est in ("fp", "fp++")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: B = 64, 3 repeats, small jacobian batches, 5 epochs")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch intra-op threads (default 2; use 1 on a busy machine)")
    ap.add_argument("--batch", type=int, default=None, help="batch B (default 256; 64 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats (default 7; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default 5)")
    ap.add_argument("--jac-batch", type=int, nargs=2, default=None, metavar=("B66", "B498"),
                    help="jacobian batches for d = 66 and d = 498 (default 32 4; 4 1 with --quick)")
    ap.add_argument("--jac-reps", type=int, default=None, help="timed jacobian repeats (default 3; 1 with --quick)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs of the stiff flow (default 15; 5 with --quick)")
    ap.add_argument("--train-samples", type=int, default=5000)
    ap.add_argument("--skip", choices=["66", "498", "trained"], nargs="*", default=[], help="parts to skip")
    ap.add_argument("--plain", action="store_true",
                    help="run the scripted methods with torch.jit.optimized_execution(False), as "
                         "PerturbedFlow's wrappers may do (default: TorchScript's profiling executor)")
    args = ap.parse_args(argv)
    q = args.quick
    args.batch = args.batch or (64 if q else 256)
    args.reps = args.reps or (3 if q else 7)
    args.jac_batch = args.jac_batch or ([4, 1] if q else [32, 4])
    args.jac_reps = args.jac_reps or (1 if q else 3)
    args.epochs = args.epochs or (5 if q else 15)
    torch.set_num_threads(args.threads)
    with torch.jit.optimized_execution(not args.plain):
        run(args)


def run(args) -> None:
    q = args.quick
    t_start = time.perf_counter()
    print("## Estimator cost and exact vs fast inverse\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- machine: {cpu_name()}, nproc = {os.cpu_count()}, torch {torch.__version__}, "
          f"torch threads = {torch.get_num_threads()}")
    print(f"- load average (1/5/15 min) at start: {load()}")
    print(f"- float64, 20 RK4 steps (quadratic grid), warm-up {args.warmup} calls, median of {args.reps} "
          f"(jacobian: {args.jac_reps}); flags: {'--quick' if q else 'full'}; TorchScript executor: "
          f"{'plain (optimized_execution(False))' if args.plain else 'profiling (default)'}")
    for n, bj, key in ((23, args.jac_batch[0], "66"), (167, args.jac_batch[1], "498")):
        if key in args.skip:
            continue
        out = []
        l0 = load()
        bench_random(n, args.batch, bj, args, out)
        out.insert(1, f"load average before/after: {l0} / {load()}\n")
        print("\n".join(out), flush=True)
    if "trained" not in args.skip:
        out = []
        l0 = load()
        bench_trained(args, out)
        out.append(f"\nload average before/after: {l0} / {load()}")
        print("\n".join(out), flush=True)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s; load average at end: {load()}")


if __name__ == "__main__":
    main()
