"""``flowpert sample``: unbiased sampling with hybrid MD + flow-perturbation MC through openmmtools.

One temperature: an MCMC loop (Langevin MD segment, then a FlowPerturbationMove) per iteration.
Several temperatures (``--temperatures``): openmmtools' ParallelTemperingSampler with the same moves
(run under mpiexec to distribute replicas). Writes to OUT/: trajectory.dcd (+ .pdb topology) of the
target temperature, energies.csv, summary.json and plots. Running the same command again continues
an interrupted run from its checkpoint (``--restart`` starts over). Each flow move draws its next
state among the current one and the proposals in proportion to the weights (``--selection
metropolis``: a chain of Metropolis tests instead, the rule before 2026-12-06); ``--recycle`` adds
estimates over every point the moves weighed (Rao-Blackwellized; summary.json "recycled"), usually
with a smaller error for the same run.
"""
from __future__ import annotations

import os

from . import _args
from .simulate import add_system_arguments, parse_temperatures

#: Files a run writes in OUT (checked before the run: none of them may be a folder).
OUTPUTS = ("trajectory.dcd", "trajectory.pdb", "energies.csv", "summary.json", "energies.png", "acceptance.png",
           "ramachandran.png")
CHECKPOINT = "checkpoint.pt"                                            # one temperature (run_hybrid)
STORAGE = ("replica_exchange.nc", "replica_exchange_checkpoint.nc")    # several (openmmtools storage)
_RESTART = "Rerun with --restart to start over (deletes the checkpoint), or choose a new --out"


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="hybrid MD + flow MC (or replica exchange) with a trained flow",
                       description=__doc__, formatter_class=_args.HelpFormatter)
    add_system_arguments(p)
    p.add_argument("--flow", default=None, help="flow file (.pt); default: the bundled flow of the system, if any")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--temperature", "--temperatures", dest="temperatures", default="300", type=_args.temperatures,
                   help="K; a list or LO:HI:N runs replica exchange (first = target)")
    p.add_argument("--iterations", type=_args.positive_int, default=1000,
                   help="iterations (MD segment + flow move), resumed ones included")
    p.add_argument("--minutes", type=_args.positive_float, default=None,
                   help="wall-clock budget, resumed time included (single temperature; default: none, "
                        "--iterations decides)")
    p.add_argument("--md-steps", type=_args.positive_int, default=500, help="Langevin steps per iteration (1 fs)")
    p.add_argument("--proposals", type=_args.positive_int, default=16, help="flow proposals per iteration")
    p.add_argument("--estimator", default="fp++", choices=["fp++", "fp", "jacobian"],
                   help="estimator of the proposal density in the flow moves")
    p.add_argument("--plain-md", action="store_true", help="no flow moves: plain MD with the same loop")
    p.add_argument("--selection", default="weights", choices=["weights", "metropolis"],
                   help="flow moves' rule: one draw among the current state and the proposals in proportion to "
                        "their weights (default), or a chain of Metropolis tests (the default before 2026-12-06, "
                        "which runs started then resume with)")
    p.add_argument("--recycle", action="store_true",
                   help="also estimate from every point the flow moves weighed, each with the probability of its "
                        "draw (Rao-Blackwellized; single temperature, --selection weights)")
    p.add_argument("--device", type=_args.device, default=None,
                   help="torch device of the flow in the moves, e.g. cuda (default: cpu)")
    p.add_argument("--seed", type=_args.seed, default=0, help="seed of the Langevin noise, flow moves and swaps")
    p.add_argument("--restart", action="store_true",
                   help="delete this run's checkpoint (OUT/checkpoint.pt, or OUT/replica_exchange.nc with several "
                        "temperatures) and start over, instead of resuming it")
    p.set_defaults(func=run, interrupt_hint="run the same command again to resume from its checkpoint in OUT")


def check(args):
    """Every check before the run (raises InputError); returns the temperatures."""
    temps = args.temperatures if isinstance(args.temperatures, list) else parse_temperatures(args.temperatures)
    if args.minutes is not None and len(temps) > 1:
        raise _args.InputError("--minutes applies to a single temperature; with several --temperatures give "
                               "--iterations only")
    _args.check_system(args.system)
    if args.recycle and args.selection != "weights":
        raise _args.InputError("--recycle needs --selection weights (it averages under the law of the weighted "
                               "draw); drop --recycle or --selection metropolis")
    if args.recycle and (args.plain_md or len(temps) > 1):
        raise _args.InputError("--recycle needs flow moves at a single temperature; drop --plain-md or give one "
                               "--temperature")
    if args.flow is not None and not args.plain_md:
        _args.input_file(args.flow, "--flow")
    run_files = [CHECKPOINT] if len(temps) == 1 else list(STORAGE)
    _args.output_folder(args.out, contents=list(OUTPUTS) + run_files)
    return temps


def run(args) -> int:
    from ..systems import bundled_flow

    temps = check(args)
    flow = None
    if not args.plain_md:
        flow = args.flow or bundled_flow(args.system)
        if flow is None:
            raise _args.InputError(f"no --flow given and no bundled flow for {args.system!r}; train one with "
                                   "flowpert train (or run --plain-md)")
    ms = _args.load_system(args.system, args.forcefield)
    run_files = [CHECKPOINT] if len(temps) == 1 else list(STORAGE)
    args.interrupt_hint = f"run the same command again to resume from {os.path.join(args.out, run_files[0])}"
    if args.restart:
        _args.remove_run_files(os.path.join(args.out, f) for f in run_files)
    elif len(temps) > 1:
        with _args.restart_hint([os.path.join(args.out, STORAGE[0])], _RESTART):
            _args.check_storage(os.path.join(args.out, STORAGE[0]), ms.system, temps, flow, md_steps=args.md_steps,
                                n_proposals=args.proposals, estimator=args.estimator, seed=args.seed,
                                selection=args.selection)
    with _args.created_folders(args.out):
        with _args.restart_hint([os.path.join(args.out, run_files[0])], _RESTART):
            if len(temps) == 1:
                return _single(args, ms, temps[0], flow)
            return _replica_exchange(args, ms, temps, flow)


def write_outputs(out: str, ms, temperature: float, positions, energies, accepted, proposed, extra: dict,
                  flow=None, seed: int = 0, candidates=None) -> dict:
    """trajectory.dcd, energies.csv, plots and summary.json of a run at ``temperature`` (K) in ``out``.

    ``positions`` (n, N, 3) nm, ``energies`` (n,) reduced (kT), ``accepted`` / ``proposed`` (n,)
    flow-move counts per iteration; ``flow``: the flow file of the moves (None for plain MD).
    ``candidates``: a run's recorded flow-move points (a ``HybridResult`` of ``run_hybrid(...,
    record_candidates=True)``); the summary then adds their Rao-Blackwellized estimates under
    ``"recycled"``. Returns the summary dict.
    """
    import numpy as np

    from ..analysis import backbone_dihedrals, mean_and_se, phi_populations
    from . import plots
    from ._io import write_json, write_trajectory

    write_trajectory(os.path.join(out, "trajectory.dcd"), positions, ms.topology)
    import csv

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["iteration", "reduced_energy_kT", "accepted", "proposed"])
            for i, (u, a, p) in enumerate(zip(energies, accepted, proposed)):
                w.writerow([i + 1, f"{u:.6f}", int(a), int(p)])

    from .._files import atomic_write

    atomic_write(os.path.join(out, "energies.csv"), write_csv, suffix=".csv")
    m, se, g = mean_and_se(energies)
    summary = {"system": ms.name, "temperature_K": temperature, "iterations": len(energies),
               "flow": None if flow is None else os.path.abspath(flow),
               "acceptance": float(np.sum(accepted) / max(np.sum(proposed), 1)) if np.sum(proposed) else None,
               "n_accepted": int(np.sum(accepted)), "n_proposed": int(np.sum(proposed)),
               "mean_reduced_energy": [m, se], "statistical_inefficiency_energy": g}
    summary.update(extra)
    curves = {"samples": energies}
    if np.sum(proposed):  # what the flow proposes, against what the chain accepted
        import openmm_flowpert as fp

        from ..energies import ReducedPotential

        proposals = fp.PerturbedFlow.load(flow).sample(500, seed=seed)
        curves = {"flow proposals": ReducedPotential(ms.system, temperature)(proposals),
                  "samples (MD + accepted flow moves)": energies}
    plots.energy_histograms(os.path.join(out, "energies.png"), curves, temperature)
    if np.sum(proposed):
        plots.acceptance_over_time(os.path.join(out, "acceptance.png"), accepted, proposed)
    try:
        phi, psi = backbone_dihedrals(positions, ms.topology)
    except ValueError:
        phi = None
    if phi is not None:
        if phi.shape[1] == 1:  # a dipeptide: the populations of its one phi (the demo's observable)
            summary["populations"] = {k: {"mean": v[0], "se": v[1], "g": v[2]}
                                      for k, v in phi_populations(phi).items()}
            label = "this run"
        else:
            label = f"this run ({phi.shape[1]} residues pooled)"
        plots.ramachandran(os.path.join(out, "ramachandran.png"), {label: (phi.ravel(), psi.ravel())})
    if candidates is not None and len(energies):
        summary["recycled"] = _recycled(candidates, ms.topology, with_phi=phi is not None and phi.shape[1] == 1)
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _recycled(res, topology, with_phi: bool) -> dict:
    """Rao-Blackwellized mean reduced energy (kT) and, for a dipeptide, phi populations."""
    from ..analysis import recycled_mean_and_se

    m, se, ess = recycled_mean_and_se(res.candidate_energies, res.candidate_probabilities)
    out = {"mean_reduced_energy": [m, se], "effective_samples_energy": ess}
    if with_phi:
        out["populations"] = {k: {"mean": v[0], "se": v[1], "g": v[2]}
                              for k, v in res.recycled_phi_populations(topology).items()}
    return out


def _single(args, ms, temperature, flow) -> int:
    from ..samplers import run_hybrid

    recycle = {"record_candidates": True} if args.recycle else {}
    res = run_hybrid(ms.system, ms.positions, temperature, flow, n_iterations=args.iterations,
                     seconds=None if args.minutes is None else 60.0 * args.minutes, md_steps=args.md_steps,
                     n_proposals=args.proposals, estimator=args.estimator, seed=args.seed,
                     checkpoint=os.path.join(args.out, CHECKPOINT), checkpoint_every=25, progress=True,
                     device=args.device, selection=args.selection, **recycle)
    s = write_outputs(args.out, ms, temperature, res.positions, res.reduced_energies, res.accepted, res.proposed,
                      {"wall_time_s": float(res.wall_times[-1]) if len(res) else 0.0,
                       "md_steps_per_iteration": args.md_steps,
                       **({"selection": args.selection} if flow is not None else {})}, flow=flow, seed=args.seed,
                      candidates=res if args.recycle else None)
    _print_summary(s)
    return 0


def replica_exchange_outputs(out: str, ms, temps, flow, iterations: int, md_steps: int, proposals: int,
                             estimator: str = "fp++", seed: int = 0, device=None, platform=None,
                             selection: str = "weights") -> None:
    """Run (or resume) replica exchange into ``out``/replica_exchange.nc and write the target
    temperature's outputs there (rank 0 only under MPI); temperatures in K."""
    import numpy as np

    from ..samplers.replica_exchange import run_replica_exchange

    storage = os.path.join(out, STORAGE[0])
    if os.path.exists(storage):
        print(f"resuming replica exchange from {storage}")
    res = run_replica_exchange(ms.system, ms.positions, temps, iterations, storage, flow=flow, md_steps=md_steps,
                               n_proposals=proposals, estimator=estimator, seed=seed, device=device,
                               platform=platform, selection=selection)
    if res is None:
        return   # not rank 0: rank 0 holds the storage and writes the outputs
    us = res.reduced_energies[0]
    acc, prop = np.zeros(len(us), dtype=int), np.zeros(len(us), dtype=int)
    stats = res.move_statistics
    if stats.get("n_proposed") and len(us):
        acc[-1], prop[-1] = stats["n_accepted"], stats["n_proposed"]
    s = write_outputs(out, ms, temps[0], res.positions[0], us, acc, prop,
                      {"temperatures_K": temps, "move_statistics": stats, "storage": storage,
                       "swap_acceptance": res.swap_acceptance.tolist(),
                       **({"selection": selection} if flow is not None else {})}, flow=flow, seed=seed)
    _print_summary(s)


def _replica_exchange(args, ms, temps, flow) -> int:
    replica_exchange_outputs(args.out, ms, temps, flow, args.iterations, args.md_steps, args.proposals,
                             args.estimator, args.seed, args.device, selection=args.selection)
    return 0


def _print_summary(s: dict) -> None:
    print(f"{s['system']} at {s['temperature_K']:.1f} K: {s['iterations']} iterations")
    if s.get("acceptance") is not None:
        what = " moves per proposal: one weighted draw per move" if s.get("selection") == "weights" else ""
        print(f"  flow-move acceptance  {s['acceptance']:.3f} ({s['n_accepted']} / {s['n_proposed']}{what})")
    m, se = s["mean_reduced_energy"]
    print(f"  mean reduced energy   {m:.2f} +- {se:.2f} kT")
    for k, v in (s.get("populations") or {}).items():
        print(f"  population {k:<12s} {100 * v['mean']:.2f} +- {100 * v['se']:.2f} %")
    if s.get("recycled"):
        r = s["recycled"]
        print("  Rao-Blackwellized over every point the flow moves weighed:")
        print(f"  mean reduced energy   {r['mean_reduced_energy'][0]:.2f} +- {r['mean_reduced_energy'][1]:.2f} kT")
        for k, v in (r.get("populations") or {}).items():
            print(f"  population {k:<12s} {100 * v['mean']:.2f} +- {100 * v['se']:.2f} %")
