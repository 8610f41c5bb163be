"""The papers' GMM benchmarks with flow-perturbation SMC (docs/algorithm.md sections 7-8).

    python benchmarks/gmm_smc.py --dim 10   --walkers 1000 --steps 500
    python benchmarks/gmm_smc.py --dim 1000 --walkers 256  --steps 200 --hidden 256 --epochs 15
    python benchmarks/gmm_smc.py --dim 100  --walkers 256  --steps 50 --exact-field --flow-steps 32
    python benchmarks/gmm_smc.py --dim 1000 --exact-field --flow-steps 64 --importance 256
    python benchmarks/gmm_smc.py --dim 1000 --exact-field --flow-steps 64 --fast-inverse --metropolis 32 40

Trains a flow on exact samples drawn 50/50 from the two wells (so reweighting must recover
1/4 : 3/4), or with ``--exact-field`` uses the exact flow-matching field of that 50/50 mixture
(``testsystems.GaussianMixtureField``: a perfectly trained flow, no training; ``--flow-steps`` RK4
steps on the quadratic grid, 32 by default), then runs SMC on the weight exponent with fp, fp++,
jacobian, hutchinson(1) and hutchinson(10). Reports per method: fraction with x0 < 0 (exact 0.25), weighted mean reduced
energy (exact by direct sampling), final acceptance, variance of log W over the final walkers,
log Z (exact 0), wall time, and the cost of one weight evaluation. Methods whose SMC would not fit
the budget (``--max-seconds``) are timed on a few weight evaluations only. ``--importance N`` and
``--metropolis CHAINS ITERS`` replace SMC by independent proposals or by independence Metropolis
chains started from exact samples.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import openmm_flowpert as fp
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_name  # noqa: E402

from openmm_flowpert.analysis import pareto_khat, weighted_mean_and_se  # noqa: E402
from openmm_flowpert.testsystems import GaussianMixtureField, GaussianMixtureTarget  # noqa: E402
from openmm_flowpert.training.importance import kish_fraction  # noqa: E402


def time_weights(flow, estimator, n_probes, n, exact_inverse, seed=0):
    noise = fp.Noise(seed)
    t0 = time.perf_counter()
    flow.propose(n, noise, estimator=estimator, n_probes=n_probes, exact_inverse=exact_inverse)
    return (time.perf_counter() - t0) / n


def importance(flow, gmm, estimator, n_probes, n, exact_inverse, seed=0, chunk=16, density=None):
    """n proposals of one estimator: var log W (finite ones), their share, the self-normalized
    importance estimates of P(x0 < 0) and <u> with delta-method SEs, Kish ESS, seconds per weight.
    ``density``: a target whose energy is -log q of the continuous flow (the 50/50 mixture for the
    exact field); then also var log W with that density and the estimator's log W minus it (mean, std)."""
    noise = fp.Noise(seed)
    xs, u, lq, t0 = [], [], [], time.perf_counter()
    for _ in range(0, n, chunk):
        p = flow.propose(chunk, noise, estimator=estimator, n_probes=n_probes, exact_inverse=exact_inverse)
        xs.append(p.x), u.append(gmm.energy(p.x)), lq.append(p.log_q)
    per = (time.perf_counter() - t0) / (len(lq) * chunk)
    x, u, lq = torch.cat(xs), torch.cat(u).numpy(), torch.cat(lq).numpy()
    lw = -u - lq
    extra = {}
    if density is not None:
        lw_continuous = density.energy(x).numpy() - u  # log p_target - log q of the continuous flow
        extra = {"var_log_w_continuous": float(lw_continuous.var(ddof=1)),
                 "log_w_minus_continuous": [float(np.nanmean(lw - lw_continuous)),
                                            float(np.nanstd(lw - lw_continuous))]}
    x0 = x[:, 0].numpy()
    ok = np.isfinite(lw)
    w = np.exp(lw[ok] - lw[ok].max())
    return {**extra, "seconds_per_weight": per, "n": int(len(lw)), "finite": float(ok.mean()),
            "var_log_w": float(lw[ok].var(ddof=1)), "kish_ess": kish_fraction(lw),
            "pareto_khat": pareto_khat(lw[ok]) if ok.sum() >= 25 else None,
            "fraction_left": list(weighted_mean_and_se((x0[ok] < 0).astype(float), w)),
            "mean_u": list(weighted_mean_and_se(u[ok], w))}


def metropolis(flow, gmm, estimator, chains, iters, exact_inverse, seed=0):
    """Independence Metropolis: ``chains`` chains started from exact target samples (stationary from
    the start) x ``iters`` proposals; acceptance, P(x0 < 0) and <u> (kT) with SEs from the chain means."""
    t0 = time.perf_counter()
    res = fp.run_metropolis(flow, gmm.energy, chains, iters, estimator=estimator, x0=gmm.sample(chains, seed=seed),
                            seed=seed, exact_inverse=exact_inverse, store_positions=False,
                            observable=lambda x: (x[:, 0] < 0).double(), progress=True)

    def mean_se(a):
        m = a.double().mean(0).numpy()
        return [float(m.mean()), float(m.std(ddof=1) / np.sqrt(len(m)))]
    return {"acceptance": float(res.accepted.double().mean()), "n_nonfinite": res.n_nonfinite,
            "fraction_left": mean_se(res.observables), "mean_u": mean_se(res.reduced_energies),
            "seconds_per_weight": (time.perf_counter() - t0) / (chains * (iters + 1))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--walkers", type=int, default=1000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--sweeps", type=int, default=2)
    p.add_argument("--k", type=int, nargs=2, default=None, help="latent coordinates redrawn (start end)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--flow-steps", type=int, default=None,
                   help="integrator steps of the flow (default: 16 for a trained flow, 32 for --exact-field)")
    p.add_argument("--exact-field", action="store_true",
                   help="use the exact flow-matching field of the 50/50 mixture instead of training a flow "
                        "(--hidden, --epochs and --samples are then ignored)")
    p.add_argument("--methods", default="fp,fp++,jacobian,hutchinson:1,hutchinson:10")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="skip the SMC of a method predicted slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="independent SMC runs per method (seeds seed, seed+1, ...)")
    p.add_argument("--importance", type=int, default=0, metavar="N",
                   help="instead of SMC: N independent proposals per method, their var log W, finite share, "
                        "importance estimates and Kish ESS (the estimators compared at equal sample count)")
    p.add_argument("--metropolis", type=int, nargs=2, default=None, metavar=("CHAINS", "ITERS"),
                   help="instead of SMC: independence Metropolis, CHAINS chains from exact samples x ITERS proposals")
    p.add_argument("--fast-inverse", action="store_true",
                   help="exact_inverse=False for every proposal (importance, Metropolis and SMC)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.flow_steps is None:
        args.flow_steps = 32 if args.exact_field else 16
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gmm = GaussianMixtureTarget(dim=args.dim)
    exact_u, exact_u_se = gmm.exact_mean_energy(200_000)
    t0 = time.perf_counter()
    if args.exact_field:  # a perfectly trained flow on 50/50 data: the exact field, RK4 on the quadratic grid
        flow = GaussianMixtureField.from_target(gmm, weights=(0.5, 0.5)).build_flow(args.flow_steps, "quadratic")
    else:
        flow = fp.train_flow(gmm.sample(args.samples, seed=1, weights=(0.5, 0.5)), epochs=args.epochs,
                             hidden=args.hidden, n_layers=3, n_steps=args.flow_steps, seed=args.seed, progress=True)
    out = {"dim": args.dim, "flow": "exact-field" if args.exact_field else "trained",
           "train_s": time.perf_counter() - t0, "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "exact_mean_u": [exact_u, exact_u_se], "args": vars(args), "methods": {}}
    k = args.k or [min(100, args.dim), 2]
    for m in args.methods.split(","):
        est, _, n_pr = m.partition(":")
        n_pr = int(n_pr or 1)
        if args.metropolis:
            if n_pr != 1:
                raise SystemExit(f"gmm_smc: --metropolis runs one probe per estimator; drop ':{n_pr}' from {m}")
            out["methods"][m] = row = metropolis(flow, gmm, est, *args.metropolis, not args.fast_inverse, args.seed)
            print(m, json.dumps(row), flush=True)
            continue
        if args.importance:
            n = min(args.importance, 32) if est == "jacobian" and args.dim > 100 else args.importance
            density = GaussianMixtureTarget(dim=args.dim, weights=(0.5, 0.5)) if args.exact_field else None
            out["methods"][m] = row = importance(flow, gmm, est, n_pr, n, not args.fast_inverse, args.seed,
                                                 density=density)
            print(m, json.dumps(row), flush=True)
            continue
        per = time_weights(flow, est, n_pr, 8 if est == "jacobian" and args.dim > 100 else 64, not args.fast_inverse)
        predicted = per * args.walkers * (args.sweeps * args.steps + 1)
        row = {"seconds_per_weight": per, "predicted_smc_s": predicted}
        if predicted <= args.max_seconds:
            runs = []
            for rep in range(args.repeats):
                smc = fp.FlowPerturbationSMC(flow, gmm.energy, n_walkers=args.walkers, n_annealing_steps=args.steps,
                                             sweeps=args.sweeps, k=tuple(k), k_eps=tuple(k), estimator=est,
                                             n_probes=n_pr, seed=args.seed + rep,
                                             exact_inverse=not args.fast_inverse)
                r = smc.run(progress=True)
                ok = torch.isfinite(r.log_w)
                runs.append([r.estimate((r.x[:, 0] < 0).double()), r.estimate(gmm.energy(r.x)), r.log_z,
                             float(r.acceptance[-1]), float(r.log_w[ok].var()), r.n_ancestors, r.wall_time_s])
            a = np.asarray(runs)
            mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1])
            names = ["fraction_left", "mean_u", "log_z", "final_acceptance", "var_log_w", "n_ancestors", "wall_s"]
            row.update({nm: [float(mean[i]), float(se[i])] for i, nm in enumerate(names)})
        out["methods"][m] = row
        print(m, json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
