"""``flowpert chignolin``: the paper's headline system (CLN025, all atoms) from data to populations.

Stages, each reading the previous ones' files under OUT/ and safe to re-run (interrupted replica
exchange, training and SMC resume from their checkpoints):

  system  build CLN025 (5awl + pdbfixer hydrogens, amber14 + OBC2, 166 atoms), minimize -> system/
  data    replica-exchange MD (openmmtools ParallelTemperingSampler), frames at the target -> data/
  train   the internal-coordinate flow and the Cartesian-MLP flow -> flows/
  smc     flow-perturbation SMC with the internal-coordinate flow -> smc/
  rex     replica exchange with hybrid MD + flow-perturbation moves -> rex/
  report  folded fraction (C-alpha distance Tyr1-Trp9 < 0.75 nm) and RMSD to the crystal of every
          run against the replica-exchange reference; plots -> report/

``--scale smoke`` runs everything on a CPU at toy size (numbers meaningless, every file written);
``--scale cpu`` runs short real runs on one core (timings: docs/benchmarks.md section 9);
``--scale full`` is the GPU protocol of examples/chignolin/README.md.
"""
from __future__ import annotations

import os
import time
from typing import Dict

import numpy as np

from ..samplers.replica_exchange import mpi_comm as _mpi_comm
from . import _args

STAGES = ("system", "data", "train", "smc", "rex", "report")
MPI_STAGES = ("data", "rex")   # the stages that may run under mpiexec (openmmtools replica exchange)

#: Folded/unfolded observable: C-alpha distance of Tyr1 and Trp9 (0-based residues 0 and 8) in nm.
#: The best-separating C-alpha pair (Fisher ratio 8.6) between 100 ps of 300 K MD from the crystal
#: structure (mean 0.57 nm, all frames < 0.75 nm) and 300 ps of 600 K MD (mean 1.48 nm, none
#: < 0.75 nm): docs/benchmarks.md section 9, examples/chignolin/select_pair.py. The paper's 0.75 nm
#: threshold falls in the gap between the two.
CA_PAIR = (0, 8)
FOLDED_BELOW_NM = 0.75

PRESETS: Dict[str, dict] = {
    "smoke": {
        "temperatures": "300:400:4", "re_iterations": 24, "re_md_steps": 50,
        "internal": dict(hidden=64, n_layers=2, n_steps=4, epochs=3, batch_size=32, lr=2e-3, ema=0.995),
        "cartesian": dict(hidden=64, n_layers=2, n_steps=4, epochs=3, batch_size=32, lr=2e-3, ema=0.995),
        "smc": dict(n_walkers=16, n_annealing_steps=5, sweeps=1, k=(16, 2), k_eps=(16, 2)),
        "rex": dict(iterations=3, md_steps=20, proposals=2),
        "proposals_for_plots": 32,
    },
    "cpu": {
        # docs/benchmarks.md section 9: 100 ps per replica, a small flow, 128 SMC walkers
        "temperatures": "300:450:4", "re_iterations": 1000, "re_md_steps": 100,
        "internal": dict(hidden=256, n_layers=3, n_steps=12, epochs=60, batch_size=128, lr=2e-3, ema=0.995),
        "cartesian": dict(hidden=256, n_layers=3, n_steps=12, epochs=60, batch_size=128, lr=2e-3, ema=0.995),
        "smc": dict(n_walkers=128, n_annealing_steps=100, sweeps=1, k=(100, 2), k_eps=(100, 2)),
        "rex": dict(iterations=200, md_steps=100, proposals=8),
        "proposals_for_plots": 256,
    },
    "full": {
        # 40,000 iterations x 250 fs = 10 ns per replica, 40,000 frames at 300 K (the paper: 160,000).
        "temperatures": "300:450:8", "re_iterations": 40000, "re_md_steps": 250,
        "internal": dict(hidden=512, n_layers=4, n_steps=20, epochs=500, batch_size=512, lr=2e-3, ema=0.995),
        "cartesian": dict(hidden=1024, n_layers=4, n_steps=20, epochs=500, batch_size=512, lr=2e-3, ema=0.995),
        "smc": dict(n_walkers=4000, n_annealing_steps=15000, sweeps=2, k=(100, 2), k_eps=(100, 2)),
        "rex": dict(iterations=5000, md_steps=500, proposals=16),
        "proposals_for_plots": 2000,
    },
}


def add_parser(sub) -> None:
    p = sub.add_parser("chignolin", help="CLN025 pipeline: data, flows, SMC, hybrid replica exchange, report",
                       description=__doc__, formatter_class=_args.HelpFormatter)
    p.add_argument("stages", nargs="*", default=None, metavar="STAGE",
                   help=f"stages to run: {', '.join(STAGES)} or all (without a STAGE: all)")
    p.add_argument("--out", default="chignolin", help="output folder")
    p.add_argument("--scale", default="smoke", choices=sorted(PRESETS), help="protocol size")
    p.add_argument("--temperature", type=_args.positive_float, default=300.0, help="target temperature in K")
    p.add_argument("--platform", type=_args.platform, default=None,
                   help="OpenMM platform for energies and MD, e.g. CUDA (default: the fastest)")
    p.add_argument("--smc-energy-platform", type=_args.platform, default="CPU",
                   help="OpenMM platform of the SMC energies (CPU: one worker per core; a GPU context "
                        "evaluates walkers one at a time, see docs/benchmarks.md section 9)")
    p.add_argument("--device", type=_args.device, default="cpu",
                   help="torch device of training and of the flow in SMC and in the hybrid moves (cpu or cuda)")
    p.add_argument("--mixed-precision", action="store_true", help="bfloat16 autocast in training (CUDA only)")
    p.add_argument("--seed", type=_args.seed, default=0, help="seed of every stage")
    g = p.add_argument_group("overrides of the --scale preset")
    g.add_argument("--re-iterations", type=_args.positive_int,
                   help="replica-exchange iterations of the data stage (more: extends an existing run)")
    g.add_argument("--epochs", type=_args.positive_int, help="training epochs of both flows")
    g.add_argument("--walkers", type=_args.positive_int, help="SMC walkers")
    g.add_argument("--smc-steps", type=_args.positive_int, help="SMC steps")
    g.add_argument("--rex-iterations", type=_args.positive_int, help="iterations of the hybrid replica exchange")
    p.set_defaults(func=run, interrupt_hint="run the same command again: finished stages are kept and the "
                                            "interrupted one resumes from its checkpoint")


def _preset(args) -> dict:
    """The --scale preset with the command line's overrides applied."""
    import copy

    preset = copy.deepcopy(PRESETS[args.scale])
    if getattr(args, "re_iterations", None):
        preset["re_iterations"] = args.re_iterations
    if getattr(args, "epochs", None):
        preset["internal"]["epochs"] = preset["cartesian"]["epochs"] = args.epochs
    if getattr(args, "walkers", None):
        preset["smc"]["n_walkers"] = args.walkers
    if getattr(args, "smc_steps", None):
        preset["smc"]["n_annealing_steps"] = args.smc_steps
    if getattr(args, "rex_iterations", None):
        preset["rex"]["iterations"] = args.rex_iterations
    return preset


def run(args) -> int:
    stages = list(STAGES) if args.stages in (["all"], [], None) else args.stages
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)} or all")
    comm = _mpi_comm()
    if comm is not None and comm.size > 1 and any(s not in MPI_STAGES for s in stages):
        raise ValueError(f"under mpiexec run only the replica-exchange stages ({' '.join(MPI_STAGES)}), which "
                         "openmmtools spreads over the ranks; run the other stages without mpiexec")
    if args.mixed_precision and not str(args.device).startswith("cuda"):
        raise _args.InputError("--mixed-precision needs --device cuda (bfloat16 autocast on a GPU)")
    _args.output_folder(args.out)
    root = comm is None or comm.rank == 0
    preset = _preset(args)
    with _args.created_folders(args.out):
        for stage in STAGES:
            if stage in stages:
                t0 = time.time()
                if root:
                    print(f"== {stage} ==", flush=True)
                globals()[f"_{stage}"](args, preset)
                if root:
                    print(f"== {stage} done in {time.time() - t0:.0f} s", flush=True)
    return 0


# -- helpers -----------------------------------------------------------------------------------------
def _path(args, *parts) -> str:
    return os.path.join(args.out, *parts)


def _system(args, preset=None):
    """Build (and on first use minimize and write) the system; returns a MolecularSystem whose
    positions are the minimized structure."""
    import openmm
    from openmm import unit

    from ..systems import MolecularSystem, cln025
    from ._io import read_trajectory, write_json, write_trajectory

    cached = getattr(args, "_cln025", None)  # built once per command, shared by the stages
    if cached is not None:
        return cached
    ms = cln025("implicit")
    pdb = _path(args, "system", "minimized.pdb")
    if not os.path.exists(pdb):
        ctx = openmm.Context(ms.system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
        ctx.setPositions(ms.positions * unit.nanometer)
        e0 = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 2000)
        st = ctx.getState(getEnergy=True, getPositions=True)
        x = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        e1 = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        write_trajectory(_path(args, "system", "minimized.dcd"), x[None], ms.topology)
        write_json(_path(args, "system", "system.json"), {
            "name": ms.name, "n_atoms": ms.n_atoms, "n_constraints": ms.system.getNumConstraints(),
            "forces": [type(f).__name__ for f in ms.system.getForces()],
            "energy_crystal_kJ_per_mol": e0, "energy_minimized_kJ_per_mol": e1,
            "ca_pair_residues": list(CA_PAIR), "folded_below_nm": FOLDED_BELOW_NM})
        print(f"CLN025: {ms.n_atoms} atoms, {ms.system.getNumConstraints()} constraints; "
              f"energy {e0:.1f} -> {e1:.1f} kJ/mol after minimization")
    # every stage starts from the structure as written (so one call and stage-by-stage calls agree)
    x, _ = read_trajectory(pdb)
    args._cln025 = MolecularSystem(ms.name, ms.system, ms.topology, x[0].astype(np.float64))
    return args._cln025


def _replica_exchange(args, out, iterations, md_steps, proposals, flow):
    from .sample import replica_exchange_outputs
    from .simulate import parse_temperatures

    ms = _system(args)
    temps = parse_temperatures(_temperatures(args))
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    replica_exchange_outputs(out, ms, temps, flow, iterations, md_steps, proposals, seed=args.seed,
                             device=None if args.device == "cpu" else args.device, platform=args.platform)
    return time.time() - t0, temps


def _temperatures(args) -> str:
    lo, hi, n = PRESETS[args.scale]["temperatures"].split(":")
    return f"{args.temperature:g}:{float(hi) * args.temperature / 300.0:g}:{n}"


# -- stages ------------------------------------------------------------------------------------------
def _data(args, preset) -> None:
    from ._io import write_json

    out = _path(args, "data")
    csv = os.path.join(out, "energies.csv")
    done = 0  # iterations of a finished earlier call (the data stage extends a run when asked for more)
    if os.path.exists(csv):
        with open(csv) as fh:
            done = sum(1 for _ in fh) - 1
    wall, temps = _replica_exchange(args, out, preset["re_iterations"], preset["re_md_steps"], 0, None)
    ps = max(preset["re_iterations"] - done, 0) * preset["re_md_steps"] * 1e-3 * len(temps)
    comm = _mpi_comm()
    if ps == 0 or (comm is not None and comm.rank != 0):   # rank 0 writes the outputs
        return
    write_json(os.path.join(out, "timing.json"), {
        "wall_time_s": wall, "simulated_ps_all_replicas": ps, "replicas": len(temps),
        "wall_s_per_ns_all_replicas": wall / ps * 1000.0, "platform": args.platform or "openmmtools default"})


def _train(args, preset) -> None:
    import torch

    import openmm_flowpert as fp

    from ..energies import ReducedPotential
    from ._io import read_trajectory

    x, top = read_trajectory(_path(args, "data", "trajectory.dcd"))
    x = x[len(x) // 10:]  # drop the first 10 % (equilibration from the crystal structure)
    rp = ReducedPotential(_system(args).system, args.temperature, platform=args.platform)
    for kind in ("internal", "cartesian"):
        path = _path(args, "flows", f"{kind}.pt")
        if os.path.exists(path):
            print(f"{path} exists; delete it to retrain")
            continue
        flow = fp.train_flow(torch.as_tensor(x), topology=top.to_openmm() if kind == "internal" else None,
                             coordinates=kind, patience=10 ** 9, temperature=args.temperature, energy=rp,
                             n_validation_proposals=min(256, len(x)), checkpoint=path + ".ckpt", seed=args.seed,
                             device=args.device, mixed_precision=args.mixed_precision, progress=True,
                             **preset[kind])
        flow.save(path)
        os.unlink(path + ".ckpt")
        info = flow.metadata["training"]
        d = flow.dim - 3 if kind == "cartesian" else flow.dim  # Cartesian: the mean-free subspace of 3N
        print(f"{kind} flow: d = {d}, {info['wall_time_s']:.0f} s; median u of proposals "
              f"{info['proposal_median_energy']:.1f} kT vs data {info['data_median_energy']:.1f} kT")


def _observables(x: np.ndarray, topology, crystal: np.ndarray) -> Dict[str, np.ndarray]:
    from ..analysis import ca_distances, rmsd_to

    d = ca_distances(x, topology, CA_PAIR)[:, 0]
    return {"ca_distance_nm": d, "folded": (d < FOLDED_BELOW_NM).astype(float),
            "rmsd_nm": rmsd_to(x, crystal, topology)}


def _smc(args, preset) -> None:
    import openmm_flowpert as fp

    from .._files import atomic_write
    from ..analysis import weighted_mean_and_se
    from ..energies import ReducedPotential
    from . import plots
    from ._io import write_json, write_trajectory

    ms = _system(args)
    flow = fp.PerturbedFlow.load(_path(args, "flows", "internal.pt")).to(args.device)
    rp = ReducedPotential(ms.system, args.temperature, platform=args.smc_energy_platform)
    os.makedirs(_path(args, "smc"), exist_ok=True)
    smc = fp.FlowPerturbationSMC(flow, rp, estimator="fp", seed=args.seed,
                                 checkpoint=_path(args, "smc", "checkpoint.pt"),
                                 checkpoint_every=max(1, preset["smc"]["n_annealing_steps"] // 20), **preset["smc"])
    res = smc.run(progress=True)
    x = res.x.reshape(res.x.shape[0], ms.n_atoms, 3).numpy()
    w = res.weights.numpy()
    obs = _observables(x, ms.topology, ms.positions)
    atomic_write(_path(args, "smc", "walkers.npz"),
                 lambda tmp: np.savez(tmp, x=x, weights=w, log_w=res.log_w.numpy(), u=rp(x), **obs), suffix=".npz")
    write_trajectory(_path(args, "smc", "walkers.dcd"), x, ms.topology)
    folded = weighted_mean_and_se(obs["folded"], w)
    summary = {"n_walkers": len(w), "n_annealing_steps": smc.n_annealing_steps, "estimator": "fp", "log_z": res.log_z,
               "final_ess": float(res.ess[-1]) if len(res.ess) else None,
               "mean_acceptance": float(np.nanmean(res.acceptance)), "final_acceptance": float(res.acceptance[-1]),
               "n_resampled": res.n_resampled, "n_ancestors": res.n_ancestors, "wall_time_s": res.wall_time_s,
               "folded_fraction": {"mean": folded[0], "se": folded[1]},
               "ca_distance_nm": weighted_mean_and_se(obs["ca_distance_nm"], w)}
    write_json(_path(args, "smc", "summary.json"), summary)
    plots.smc_traces(_path(args, "smc", "traces.png"), res.b, res.ess, res.acceptance)
    print(f"SMC: {len(w)} walkers x {smc.n_annealing_steps} steps, mean acceptance {summary['mean_acceptance']:.3f}, "
          f"{res.n_ancestors} ancestors, folded {folded[0]:.3f} +- {folded[1]:.3f}")


def _flow_quality(flow, rp, n: int, seed: int) -> dict:
    """Independent fp++ proposals of a flow: reduced energies (kT), and how well they would reweight
    to the target: variance of log W = -u - log q and the importance-sampling ESS fraction."""
    import torch

    from ..noise import Noise

    prop = flow.propose(n, Noise(seed), estimator="fp++")
    u = rp(prop.x)
    log_w = torch.as_tensor(-u) - prop.log_q
    ok = torch.isfinite(log_w)
    lw = log_w[ok]
    ess = float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))) / n if len(lw) else 0.0
    return {"u": u, "n_proposals": n, "median_u": float(np.median(u)), "finite": int(ok.sum()),
            "var_log_w": float(lw.var()) if len(lw) > 1 else None, "ess_fraction": ess, "d": flow.d}


def _rex(args, preset) -> None:
    r = preset["rex"]
    _replica_exchange(args, _path(args, "rex"), r["iterations"], r["md_steps"], r["proposals"],
                      _path(args, "flows", "internal.pt"))


def _run_table(runs: dict, weights: dict) -> dict:
    """Folded fraction and RMSD (mean, SE) of every run, and its z against the MD reference."""
    from ..analysis import mean_and_se, weighted_mean_and_se

    table = {}
    for label, obs in runs.items():
        if label in weights:
            m, se = weighted_mean_and_se(obs["folded"], weights[label])
            r = weighted_mean_and_se(obs["rmsd_nm"], weights[label])
            table[label] = {"folded_fraction": [m, se], "rmsd_nm": list(r), "n": int(len(obs["folded"])),
                            "se_note": "importance-weight SE (lower bound: walkers share ancestors)"}
        else:
            m, se, g = mean_and_se(obs["folded"])
            r = mean_and_se(obs["rmsd_nm"])
            table[label] = {"folded_fraction": [m, se], "rmsd_nm": [r[0], r[1]], "n": int(len(obs["folded"])),
                            "statistical_inefficiency": g}
    ref = table.get("replica exchange (MD)")
    if ref:
        for label, row in table.items():
            diff = row["folded_fraction"][0] - ref["folded_fraction"][0]
            se = float(np.hypot(row["folded_fraction"][1], ref["folded_fraction"][1]))
            row["vs_reference"] = {"difference": diff, "z": diff / se if se > 0 else None}
    return table


def _report(args, preset) -> None:
    import openmm_flowpert as fp

    from ..energies import ReducedPotential
    from . import plots
    from ._io import read_trajectory, write_json

    ms = _system(args)
    runs, energies, weights = {}, {}, {}
    for label, folder in (("replica exchange (MD)", "data"), ("hybrid MD + FP replica exchange", "rex")):
        path = _path(args, folder, "trajectory.dcd")
        if os.path.exists(path):
            x, _ = read_trajectory(path)
            start = len(x) // 10
            runs[label] = _observables(x[start:], ms.topology, ms.positions)
            energies[label] = np.loadtxt(_path(args, folder, "energies.csv"), delimiter=",", skiprows=1,
                                         usecols=1, ndmin=1)[start:]
    smc_file = _path(args, "smc", "walkers.npz")
    if os.path.exists(smc_file):
        z = np.load(smc_file)
        label = "flow-perturbation SMC"
        runs[label] = {k: z[k] for k in ("ca_distance_nm", "folded", "rmsd_nm")}
        weights[label] = z["weights"]
        # resample by weight for the histograms (plots only; estimates use the weights)
        w = z["weights"] / z["weights"].sum()
        idx = np.random.default_rng(args.seed).choice(len(w), len(w), p=w)
        energies[label] = z["u"][idx]
    if not runs:
        raise ValueError(f"nothing to report under {args.out}: run the data, smc or rex stages first")
    rp = ReducedPotential(ms.system, args.temperature, platform=args.platform)
    flows = {}
    for kind in ("internal", "cartesian"):
        f = _path(args, "flows", f"{kind}.pt")
        if os.path.exists(f):
            flows[kind] = _flow_quality(fp.PerturbedFlow.load(f), rp, preset["proposals_for_plots"], args.seed)
            energies[f"{kind} flow proposals"] = flows[kind].pop("u")
    table = _run_table(runs, weights)
    out = _path(args, "report")
    write_json(os.path.join(out, "report.json"), {
        "observable": {"ca_pair_residues_0based": list(CA_PAIR), "folded_below_nm": FOLDED_BELOW_NM,
                       "rmsd_selection": "name CA", "reference": "system/minimized.pdb"},
        "temperature_K": args.temperature, "scale": args.scale, "runs": table, "flows": flows})
    plots.energy_histograms(os.path.join(out, "energies.png"), energies, args.temperature, range_from=list(runs))
    plots.folded_fraction_convergence(os.path.join(out, "folded_fraction.png"),
                                      {k: v["folded"] for k, v in runs.items() if k not in weights},
                                      {k: table[k]["folded_fraction"] for k in weights})
    plots.distributions(os.path.join(out, "rmsd.png"), {k: v["rmsd_nm"] for k, v in runs.items()}, weights,
                        "C-alpha RMSD to the crystal structure (nm)")
    plots.distributions(os.path.join(out, "ca_distance.png"), {k: v["ca_distance_nm"] for k, v in runs.items()},
                        weights, f"C-alpha distance, residues {CA_PAIR[0] + 1}-{CA_PAIR[1] + 1} (nm)",
                        threshold=FOLDED_BELOW_NM)
    print(f"CLN025 at {args.temperature:g} K, folded = C-alpha({CA_PAIR[0] + 1})-C-alpha({CA_PAIR[1] + 1}) "
          f"< {FOLDED_BELOW_NM} nm:")
    for label, row in table.items():
        m, se = row["folded_fraction"]
        z = row.get("vs_reference", {}).get("z")
        print(f"  {label:<34s} folded {m:.3f} +- {se:.3f}   RMSD {row['rmsd_nm'][0]:.3f} nm"
              + (f"   ({z:+.1f} SE from the reference)" if z is not None and label != "replica exchange (MD)" else ""))
    for kind, q in flows.items():
        var = "n/a" if q["var_log_w"] is None else f"{q['var_log_w']:.4g}"
        print(f"  {kind} flow (d = {q['d']}): median u of proposals {q['median_u']:.4g} kT, var log W {var}, "
              f"importance ESS {100 * q['ess_fraction']:.2f} %")
    print(f"wrote {out}/report.json and plots")
