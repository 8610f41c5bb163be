"""``flowpert demo``: unbiased sampling of alanine dipeptide with the bundled flow, against plain MD.

Alanine dipeptide in vacuum at 300 K (amber96, no constraints). Hybrid MD + flow-perturbation MC
(each iteration: a Langevin segment, then FlowPerturbationMove with the bundled internal-coordinate
flow) and plain Langevin MD run for the same wall time. The rare left-handed basin 0 < phi < 2.5 rad
holds about 1 % at 300 K (replica exchange); plain MD shows no real transition into it in 15 ns.
The flow move draws its next state among the current one and its proposals in proportion to their
weights (selection="weights"), so the hybrid estimates count every proposal it weighed, each with
the probability of its draw (Rao-Blackwellized; docs/algorithm.md section 4.3); the chain's own
estimate is printed below it. Prints acceptance and both basin populations with error bars
(statistical inefficiency from pymbar.timeseries) next to the replica-exchange reference, and
writes plots to --out.

``flowpert demo --gmm`` runs the earlier demo on the 10-D two-well Gaussian mixture instead.
"""
from __future__ import annotations

import math
import os
import time

from . import _args

#: Replica-exchange reference for 0 < phi < 2.5 rad at 300 K (percent, SE): docs/benchmarks.md, section 6
#: (mean of four independent 8-replica runs, 300-600 K, with the standard error of their spread).
RE_REFERENCE_PCT = (1.06, 0.28)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="alanine dipeptide: hybrid MD + flow MC against plain MD (the main job)",
                       description=__doc__, formatter_class=_args.HelpFormatter)
    p.add_argument("--seconds", type=_args.positive_float, default=100.0,
                   help="wall time of each run, hybrid and plain MD (s)")
    p.add_argument("--md-steps", type=_args.positive_int, default=500, help="Langevin steps of 1 fs per iteration")
    p.add_argument("--proposals", type=_args.positive_int, default=64, help="flow proposals per iteration")
    p.add_argument("--flow", default=None, help="flow file (default: the bundled alanine-dipeptide flow)")
    p.add_argument("--seed", type=_args.seed, default=0, help="seed of MD and flow moves")
    p.add_argument("--out", default="flowpert-demo", help="output folder for plots and data")
    p.add_argument("--gmm", action="store_true", help="run the Gaussian-mixture demo instead")
    g = p.add_argument_group("Gaussian-mixture demo (--gmm)")
    g.add_argument("--dim", type=_args.positive_int, default=10, help="dimension of the mixture")
    g.add_argument("--samples", type=_args.positive_int, default=20000, help="training samples")
    g.add_argument("--epochs", type=_args.positive_int, default=60, help="training epochs")
    g.add_argument("--chains", type=_args.positive_int, default=128, help="Metropolis chains run as one batch")
    g.add_argument("--iterations", type=_args.positive_int, default=200, help="Metropolis iterations per chain")
    g.add_argument("--estimator", default="fp++", choices=["fp", "fp++", "jacobian"],
                   help="estimator of the proposal density")
    p.set_defaults(func=run, interrupt_hint="the demo does not resume: run it again to start over")


#: Files the demos write in --out.
OUTPUTS = ("hybrid.dcd", "hybrid.pdb", "md.dcd", "md.pdb", "ramachandran.png", "energies.png", "acceptance.png",
           "summary.json", "gmm_flow.pt")


def check(args) -> None:
    """Every check before the demo runs (raises InputError)."""
    if args.gmm:
        if args.samples < 10:
            raise _args.InputError(f"--samples {args.samples}: train on at least 10 samples")
        if args.chains < 2:
            raise _args.InputError("--chains 1: the error bar needs at least 2 chains")
    elif args.flow is not None:
        _args.input_file(args.flow, "--flow")
    _args.output_folder(args.out, contents=OUTPUTS)


def run(args) -> int:
    check(args)
    with _args.created_folders(args.out):
        if args.gmm:
            return run_gmm(args)
        return _run(args)


def _run(args) -> int:
    import openmm_flowpert as fp
    from openmm_flowpert.analysis import backbone_dihedrals, phi_populations
    from openmm_flowpert.energies import ReducedPotential
    from openmm_flowpert.samplers import run_hybrid
    from openmm_flowpert.systems import alanine_dipeptide, bundled_flow

    from . import plots
    from ._io import write_json, write_trajectory

    t0 = time.time()
    ms = alanine_dipeptide("vacuum")
    path = args.flow or bundled_flow("alanine-dipeptide")
    if path is None:
        raise _args.InputError("the bundled alanine-dipeptide flow is missing from this installation; pass --flow FILE")
    flow = fp.PerturbedFlow.load(path)
    print(f"Alanine dipeptide, vacuum, 300 K, no constraints ({ms.n_atoms} atoms); flow {os.path.basename(path)} "
          f"({flow.coordinates} coordinates, d = {flow.d}, {flow.n_steps} RK4 steps)")
    print(f"Each run: {args.seconds:.0f} s of wall time; iteration = {args.md_steps} Langevin steps of 1 fs"
          f" (+ {args.proposals} flow proposals, fp++, in the hybrid run)")
    runs = {}
    for label, f in (("hybrid MD + FP", flow), ("plain MD", None)):
        recycle = {} if f is None else {"selection": "weights", "record_candidates": True}
        runs[label] = run_hybrid(ms.system, ms.positions, 300.0, f, seconds=args.seconds, md_steps=args.md_steps,
                                 n_proposals=args.proposals, seed=args.seed, progress=True, desc=label, **recycle)
    rp = ReducedPotential(ms.system, 300.0)
    proposals = flow.sample(1000, seed=args.seed)
    u_prop = rp(proposals)
    print()
    print(f"{'':16s} {'iterations':>10s} {'sim. time':>10s} {'acceptance':>10s} {'phi < 0':>16s} "
          f"{'0 < phi < 2.5':>16s}")
    rama, summary = {}, {"seconds_per_run": args.seconds, "re_reference_pct": RE_REFERENCE_PCT, "runs": {}}
    for label, r in runs.items():
        phi, psi = backbone_dihedrals(r.positions, ms.topology)
        chain = phi_populations(phi)
        pops = chain if r.candidate_positions is None else r.recycled_phi_populations(ms.topology)
        (m0, s0, _), (m1, s1, g1) = pops["phi<0"], pops["0<phi<2.5"]
        ns = len(r) * args.md_steps * 1e-6
        acc = "-" if math.isnan(r.acceptance) else f"{r.acceptance:.3f}"
        print(f"{label:16s} {len(r):10d} {ns:8.2f}ns {acc:>10s} {100 * m0:8.2f} +- {100 * s0:4.2f}% "
              f"{100 * m1:8.2f} +- {100 * s1:4.2f}%")
        rama[label] = (phi[:, 0], psi[:, 0])
        tag = "hybrid" if r.proposed.sum() else "md"
        write_trajectory(os.path.join(args.out, f"{tag}.dcd"), r.positions, ms.topology)
        summary["runs"][label] = {"iterations": len(r), "md_ns": ns, "acceptance": None if acc == "-" else r.acceptance,
                                  "phi<0": [m0, s0], "0<phi<2.5": [m1, s1], "statistical_inefficiency": g1}
        if pops is not chain:
            (c0, e0, _), (c1, e1, _) = chain["phi<0"], chain["0<phi<2.5"]
            print(f"{'  chain alone':16s} {'':10s} {'':10s} {'':10s} {100 * c0:8.2f} +- {100 * e0:4.2f}% "
                  f"{100 * c1:8.2f} +- {100 * e1:4.2f}%")
            summary["runs"][label].update(estimate="recycled", chain={"phi<0": [c0, e0], "0<phi<2.5": [c1, e1]})
    ref, ref_se = RE_REFERENCE_PCT
    h = runs["hybrid MD + FP"]
    if len(h):
        print(f"{'':16s} (acceptance = accepted / proposed: one draw per iteration among the current state and "
              f"{args.proposals} proposals; the state moved in {100 * (h.accepted > 0).mean():.0f} % of iterations)")
    print(f"{'replica exchange':16s} {'':10s} {'':10s} {'':10s} {'':>16s} {ref:8.2f} +- {ref_se:4.2f}%  (reference)")
    hy = summary["runs"]["hybrid MD + FP"]["0<phi<2.5"]
    if hy[1] > 0:
        z = (100 * hy[0] - ref) / math.hypot(100 * hy[1], ref_se)
        print(f"\nHybrid MD + FP vs replica exchange: {z:+.1f} combined standard errors.")
    else:  # a constant series: no transition into or out of the basin, so no error bar to compare with
        print(f"\nHybrid MD + FP saw no transition into or out of 0 < phi < 2.5 in {len(runs['hybrid MD + FP'])} "
              "iterations: its error bar cannot be estimated and no comparison is made (run longer: --seconds).")
    print("Plain MD stays in the phi < 0 basins (an error bar of 0 means no transition was seen).")
    plots.ramachandran(os.path.join(args.out, "ramachandran.png"), rama)
    plots.energy_histograms(os.path.join(args.out, "energies.png"), {
        "flow proposals": u_prop, "hybrid MD + FP": runs["hybrid MD + FP"].reduced_energies,
        "plain MD": runs["plain MD"].reduced_energies}, 300.0)
    plots.acceptance_over_time(os.path.join(args.out, "acceptance.png"), h.accepted, h.proposed)
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"Plots: {args.out}/ramachandran.png, energies.png, acceptance.png; total {time.time() - t0:.0f} s")
    return 0


def run_gmm(args) -> int:

    import openmm_flowpert as fp
    from openmm_flowpert.testsystems import GaussianMixtureTarget

    t0 = time.time()
    gmm = GaussianMixtureTarget(dim=args.dim)
    exact = gmm.exact_fraction_left
    print(f"Target: two-well Gaussian mixture, d = {args.dim}, weights 1/4 : 3/4 (exact P(x0 < 0) = {exact:.4f})")
    print(f"Training data: {args.samples} exact samples drawn 50/50 from the two wells")
    flow = fp.train_flow(gmm.sample(args.samples, seed=args.seed + 1, weights=(0.5, 0.5)), epochs=args.epochs,
                         hidden=64, n_layers=3, n_steps=16, lr=2e-3, ema=0.995, patience=20, seed=args.seed,
                         progress=True)
    path = os.path.join(args.out, "gmm_flow.pt")
    flow.save(path)
    raw = float((flow.sample(20000, seed=args.seed)[:, 0] < 0).double().mean())
    print(f"Flow saved to {path}; raw flow samples have P(x0 < 0) = {raw:.3f} (biased, as trained)")

    res = fp.run_metropolis(flow, gmm.energy, args.chains, args.iterations, estimator=args.estimator,
                            seed=args.seed, store_positions=False, progress=True,
                            observable=lambda x: (x[:, 0] < 0).double())
    burn = args.iterations // 4
    chain_means = res.observables[burn:].mean(0)
    mean = float(chain_means.mean())
    se = float(chain_means.std() / math.sqrt(chain_means.numel()))
    z = (mean - exact) / se if se > 0 else float("inf")
    print()
    print(f"FP Metropolis ({args.estimator}, independence proposals, {args.chains} chains x {args.iterations} "
          f"iterations, first {burn} discarded)")
    print(f"  acceptance          {res.acceptance:.3f}")
    print(f"  P(x0 < 0)           {mean:.4f} +- {se:.4f}  (exact {exact:.4f}, {z:+.1f} standard errors)")
    print(f"  non-finite rejected {res.n_nonfinite}")
    print(f"  noise backend       {fp.noise.backend()}; wall time {time.time() - t0:.0f} s")
    return 0
