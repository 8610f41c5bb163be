"""Effective samples per second against replica exchange: alanine dipeptide, vacuum, 300 K, 2 cores.

Every sampler gets the same wall time and the same 2 cores: two independent runs at once, one per
core (torch and OpenMM on one thread each), so a sampler's effective samples per second are the sum
over its two runs. For replica exchange that is at least as good as one 2-rank MPI run of the same
ladder (no communication), so the comparison favours the peer. Samplers:

- ``re``: openmmtools replica exchange (ParallelTemperingSampler through ``run_replica_exchange``),
  8 replicas on a geometric 300-600 K ladder, 500 Langevin steps of 1 fs per iteration;
- ``md``: plain Langevin MD, 500 steps per iteration;
- ``hybrid``: MD (500 steps) + ``FlowPerturbationMove`` (bundled flow, 16 FP++ proposals) per iteration;
- ``flow``: the same move with one MD step between applies (flow moves alone, independence proposals);
- ``hybrid-rb``, ``flow-rb``: the same two with ``selection="weights"`` (one draw among the current
  state and the proposals, in proportion to W) and ``--rb-proposals`` proposals per apply, estimated
  by Rao-Blackwellization over every point each apply weighed
  (``HybridResult.recycled_mean``, docs/algorithm.md section 4.3);
- ``is``: importance sampling with the flow's FP++ weights (batches of 256 proposals), the upper
  bound of what the flow gives;
- ``re-flow``: replica exchange with the flow move in every replica (``prior_scale="sqrt(T/T0)"``;
  a temperature-conditioned flow, ``--ladder-flow``, is used at each replica's temperature).

Observables at 300 K: the population of 0 < phi < 2.5 rad and the mean reduced energy (kT). For a
time series, effective samples = n / g (g: pymbar's statistical inefficiency; a series that never
changes has no estimable g and counts 0); for importance sampling, Kish's (sum w)^2 / sum w^2; for
the Rao-Blackwellized samplers, the observable's variance over SE^2 (the same as n / g for a chain).
Errors: within a run from g, across runs and seeds from their spread; the larger is reported.
*ESS/s* sums each run's own effective samples; *ESS/s from error* is the observable's variance over
the reported error squared, per second (it charges a sampler for runs that disagree beyond their
own error bars; for the basin the variance is the reference's p (1 - p)), and the last column is
its ratio to replica exchange. Neither catches a sampler whose runs all miss the basin alike (short
replica-exchange runs from one start): compare the estimates with the reference first. The
population's reference is 1.06 +- 0.28 % (docs/benchmarks.md section 6).

usage: python benchmarks/vs_replica_exchange.py [--seconds 60] [--seeds 1] [--samplers re,md,hybrid,...]
       [--flow FILE] [--ladder-flow FILE] [--rb-proposals 64] [--md-steps 500]
       (short mode: the defaults, a few minutes; full mode: --seconds 300 --seeds 3)
"""
import argparse
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

SAMPLERS = ("re", "md", "hybrid", "flow", "hybrid-rb", "flow-rb", "is", "re-flow")
REFERENCE_PCT = (1.06, 0.28)


def _setup():
    os.environ["OMP_NUM_THREADS"] = "1"
    import openmm_flowpert as fp  # noqa: F401  (torch before openmm)
    import torch

    torch.set_num_threads(1)
    from openmm_flowpert.systems import alanine_dipeptide, bundled_flow

    return alanine_dipeptide("vacuum"), bundled_flow("alanine-dipeptide")


def _series(positions, reduced, topology) -> dict:
    from openmm_flowpert.analysis import backbone_dihedrals

    phi = backbone_dihedrals(positions, topology)[0][:, 0]
    return {"basin": ((phi > 0) & (phi < 2.5)).astype(float), "u": np.asarray(reduced, dtype=float)}


def _run_re(ms, flow_path, seed, seconds, with_flow) -> dict:
    from openmm_flowpert.samplers.replica_exchange import geometric_temperatures, run_replica_exchange

    temps = geometric_temperatures(300.0, 600.0, 8)
    storage = os.path.join(tempfile.mkdtemp(prefix="flowpert-bench-re-"), "re.nc")
    t0, n, res = time.perf_counter(), 0, None
    while time.perf_counter() - t0 < seconds:
        n += 25
        res = run_replica_exchange(ms.system, ms.positions, temps, n, storage, flow=flow_path if with_flow else None,
                                   seed=seed, progress=False, selection="metropolis")
    wall = time.perf_counter() - t0
    out = _series(res.positions[0], res.reduced_energies[0], ms.topology)
    out.update(wall=wall, iterations=n, acceptance=res.move_statistics.get("n_accepted", 0)
               / max(1, res.move_statistics.get("n_proposed", 0)) if with_flow else float("nan"))
    return out


def _run_hybrid(ms, flow_path, seed, seconds, kind, opts) -> dict:
    import openmm_flowpert as fp
    from openmm_flowpert.samplers.hybrid import run_hybrid

    flow = None if kind == "md" else fp.PerturbedFlow.load(flow_path)
    md_steps = 1 if kind.startswith("flow") else opts["md_steps"]
    rb = kind.endswith("-rb")
    kw = (dict(selection="weights", record_candidates=True, n_proposals=opts["rb_proposals"]) if rb
          else dict(selection="metropolis"))  # the rows recorded in docs/benchmarks.md
    t0 = time.perf_counter()
    r = run_hybrid(ms.system, ms.positions, 300.0, flow, seconds=seconds, md_steps=md_steps, seed=seed,
                   progress=False, **kw)
    wall = time.perf_counter() - t0
    if rb:  # every point each apply weighed, with the law of its draw
        shape = r.candidate_probabilities.shape
        cand = _series(r.candidate_positions.reshape(-1, *r.candidate_positions.shape[2:]),
                       r.candidate_energies.reshape(-1), ms.topology)
        out = {k: v.reshape(shape) for k, v in cand.items()}
        out["probabilities"] = r.candidate_probabilities
    else:
        out = _series(r.positions, r.reduced_energies, ms.topology)
    out.update(wall=wall, iterations=len(r), acceptance=r.acceptance)
    return out


def _run_is(ms, flow_path, seed, seconds) -> dict:
    import openmm_flowpert as fp
    from openmm_flowpert.energies import ReducedPotential

    flow, rp = fp.PerturbedFlow.load(flow_path), ReducedPotential(ms.system, 300.0)
    noise = fp.Noise(seed)
    t0, xs, us, lws = time.perf_counter(), [], [], []
    while time.perf_counter() - t0 < seconds:
        prop = flow.propose(256, noise, estimator="fp++")
        u = np.asarray(rp(prop.x), dtype=float)
        xs.append(prop.x.numpy())
        us.append(u)
        lws.append(-u - prop.log_q.numpy())
    wall = time.perf_counter() - t0
    out = _series(np.concatenate(xs), np.concatenate(us), ms.topology)
    lw = np.concatenate(lws)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    out.update(wall=wall, iterations=len(lw), acceptance=float("nan"), log_w=lw)
    return out


def run_one(task) -> dict:
    """One run of one sampler (in its own process): task = (sampler, seed, seconds, flow file or None,
    options)."""
    sampler, seed, seconds, flow_file, opts = task
    ms, flow_path = _setup()
    flow_path = flow_file or flow_path
    if sampler in ("re", "re-flow"):
        out = _run_re(ms, flow_path, seed, seconds, sampler == "re-flow")
    elif sampler == "is":
        out = _run_is(ms, flow_path, seed, seconds)
    else:
        out = _run_hybrid(ms, flow_path, seed, seconds, sampler, opts)
    out.update(sampler=sampler, seed=seed)
    return out


def estimate(run: dict, key: str) -> tuple:
    """(mean, SE, effective samples) of one run's observable."""
    from openmm_flowpert.analysis import mean_and_se, recycled_mean_and_se, weighted_mean_and_se

    v = run[key]
    if "probabilities" in run:
        return recycled_mean_and_se(v, run["probabilities"])
    if "log_w" in run:
        w = np.exp(run["log_w"] - run["log_w"].max())
        m, se = weighted_mean_and_se(v, w)
        return m, se, float(w.sum() ** 2 / (w ** 2).sum())
    m, se, g = mean_and_se(v)
    return m, se, (len(v) / g if se > 0 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="wall time of each run (default 60; full: 300)")
    p.add_argument("--seeds", type=int, default=1, help="independent repetitions of each pair (full: 3)")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--flow", default=None, help="flow file of the flow samplers (default: the bundled flow)")
    p.add_argument("--ladder-flow", default=None,
                   help="flow file of re-flow (default: --flow), e.g. a temperature-conditioned flow")
    p.add_argument("--rb-proposals", type=int, default=64,
                   help="proposals per apply of hybrid-rb and flow-rb (64: ~2x the ESS/s of 16, docs section 7)")
    p.add_argument("--md-steps", type=int, default=500, help="Langevin steps per iteration of md and hybrid(-rb)")
    args = p.parse_args()
    opts = {"rb_proposals": args.rb_proposals, "md_steps": args.md_steps}
    samplers = [s for s in args.samplers.split(",") if s]
    rows = {}
    with ProcessPoolExecutor(max_workers=2) as pool:
        for s in samplers:
            flow_file = (args.ladder_flow or args.flow) if s == "re-flow" else args.flow
            tasks = [(s, 1000 * rep + i, args.seconds, flow_file, opts) for rep in range(args.seeds)
                     for i in range(2)]
            rows[s] = list(pool.map(run_one, tasks))
            print(f"{s}: done ({len(tasks)} runs)", flush=True)
    print(f"\nalanine dipeptide, vacuum, 300 K; {args.seconds:.0f} s per run, 2 runs at once on 2 cores, "
          f"{args.seeds} seed(s); load {os.getloadavg()[0]:.1f}")
    print("| sampler | iterations / run | acceptance | 0 < phi < 2.5 (%) | ESS/s (basin) | ESS/s from error "
          "| <u> (kT) | ESS/s (u) | ratio to re (basin) | ratio from errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ess_re = None
    for s in samplers:
        runs = rows[s]
        wall = sum(r["wall"] for r in runs) / len(runs) * args.seeds  # per pair of cores
        out = {}
        for key in ("basin", "u"):
            est = [estimate(r, key) for r in runs]
            m = np.mean([e[0] for e in est])
            se = math.sqrt(sum(e[1] ** 2 for e in est)) / len(est)
            spread = np.std([e[0] for e in est], ddof=1) / math.sqrt(len(est)) if len(est) > 1 else float("nan")
            err = max(se, spread)
            # the observable's variance: the reference population's p (1 - p) for the basin (a sampler that
            # misses the basin must not claim a small variance), ESS * SE^2 per run for u
            ref = REFERENCE_PCT[0] / 100
            var = ref * (1 - ref) if key == "basin" else np.mean([e[2] * e[1] ** 2 for e in est])
            out[key] = (m, err, sum(e[2] for e in est) / wall, var / err ** 2 / wall if err > 0 else 0.0)
        if s == "re":
            ess_re = out["basin"][2:4]
        ratio = [out["basin"][2 + i] / ess_re[i] if ess_re and ess_re[i] else float("nan") for i in (0, 1)]
        acc = np.nanmean([r["acceptance"] for r in runs]) if s not in ("re", "md", "is") else float("nan")
        print(f"| {s} | {np.mean([r['iterations'] for r in runs]):.0f} | {acc:.3f} | "
              f"{100 * out['basin'][0]:.2f} +- {100 * out['basin'][1]:.2f} | {out['basin'][2]:.2f} | "
              f"{out['basin'][3]:.2f} | {out['u'][0]:.2f} +- {out['u'][1]:.2f} | {out['u'][2]:.2f} | "
              f"{ratio[0]:.2f} | {ratio[1]:.2f} |")
    print(f"\nreference 0 < phi < 2.5: {REFERENCE_PCT[0]} +- {REFERENCE_PCT[1]} % (replica exchange, section 6)")


if __name__ == "__main__":
    main()
