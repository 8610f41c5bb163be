"""Alanine dipeptide or tetrapeptide (vacuum, 300 K, no constraints): the molecular-flow recipe and its
measurements. ``--system alanine-tetrapeptide`` (before the command) runs any command on ACE-ALA3-NME.

    python benchmarks/alanine.py data    --out runs/ala_re.npz      # replica exchange (training data + reference)
    python benchmarks/alanine.py md      --out runs/ala_md.npz      # 20 ns of plain 300 K MD (more training data)
    python benchmarks/alanine.py train   --data runs/ala_re.npz --out runs/ala_ic.pt [--coordinates cartesian]
    python benchmarks/alanine.py measure --data runs/ala_re.npz --flow runs/ala_ic.pt
    python benchmarks/alanine.py marginals --flows A.pt,B.pt --heldout runs/ala_re2.npz  # per-torsion KL
    python benchmarks/alanine.py cost    --flows A.pt,B.pt                                 # ms per proposal
    python benchmarks/alanine.py kish    --flows A.pt,A.pt+B.pt --prior-scale 1.0          # exact Kish ESS
    python benchmarks/alanine.py kish    --flows A.pt --n 4000 --save runs/w_A.npz         # ... and keep them
    python benchmarks/alanine.py forces  --flows A.pt,B.pt --heldout runs/ala_re2.npz  # excess energy per force

``data``: 8 replicas geometrically spaced over 300-600 K, Langevin 1 fs, swaps every 0.5 ps, one frame per
replica every 0.5 ps. ``train``: flow matching on the 300 K frames (internal coordinates by default), EMA,
quadratic time grid, a wall-clock budget. ``measure``: median reduced energy of proposals against MD, Kish ESS
with exact log-dets, spread of log W for fp and fp++ against exact, independence-Metropolis acceptance with
fp, fp++ and exact log-dets, and the reweighted population of 0 < phi < 2.5 rad against replica exchange.
Run with OMP_NUM_THREADS set to the cores you want to use.
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

import openmm_flowpert as fp  # noqa: F401  (first: torch before openmm)
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_name  # noqa: E402

SYSTEM = {"name": "alanine-dipeptide", "built": None}  # set by --system


def molecule():
    """The built-in system chosen with --system (built once)."""
    from openmm_flowpert.systems import get_system

    if SYSTEM["built"] is None:
        SYSTEM["built"] = get_system(SYSTEM["name"])
    return SYSTEM["built"]


def in_basin(x) -> np.ndarray:
    """Per frame (B,): the fraction of residues with 0 < phi < 2.5 rad (for the dipeptide: the
    indicator of its one phi in that basin)."""
    from openmm_flowpert.analysis import PHI_BASIN, DihedralRegion

    return DihedralRegion("phi", *PHI_BASIN).fraction(np.asarray(x, dtype=np.float64), molecule().topology)


def block_se(values: np.ndarray, n_blocks: int = 20) -> float:
    b = np.array_split(np.asarray(values, dtype=np.float64), n_blocks)
    m = np.array([x.mean() for x in b])
    return float(m.std(ddof=1) / math.sqrt(n_blocks))


def cmd_data(args):
    from openmm_flowpert.samplers.replica_exchange import geometric_temperatures, run_replica_exchange

    s = molecule()
    t0 = time.time()
    storage = os.path.splitext(args.out)[0] + ".nc"   # openmmtools storage: a killed run resumes
    r = run_replica_exchange(s.system, s.positions, geometric_temperatures(300, 600, 8), 200 + args.frames, storage,
                             md_steps=500, seed=args.seed, platform="Reference", discard=200, read_states=range(8))
    wall = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, pos=np.stack([r.positions[k] for k in range(8)]).astype(np.float32), red=r.reduced_energies,
             temps=np.array(r.temperatures),
             swap=r.swap_acceptance)
    os.replace(tmp, args.out)
    pop = in_basin(r.positions[0])
    print(f"replica exchange: {wall:.0f} s, swap acceptance {np.round(r.swap_acceptance, 2).tolist()}, "
          f"300 K population 0<phi<2.5: {100 * pop.mean():.2f} +- {100 * block_se(pop):.2f} %")


def cmd_md(args):
    from openmm_flowpert.simulate import langevin_md

    s = molecule()
    t0 = time.time()
    x = langevin_md(s.system, s.positions, 300.0, args.frames, steps_per_frame=200, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, pos=x[None].astype(np.float32))
    os.replace(tmp, args.out)
    pop = in_basin(x)
    print(f"MD: {time.time() - t0:.0f} s; population 0<phi<2.5: {100 * pop.mean():.3f} %")


def all_replicas(paths):
    """Frames (nm) of every replica of every npz file and their temperatures (K); files without a
    temperature ladder (plain MD) are at 300 K."""
    xs, ts = [], []
    for p in paths.split(","):
        f = np.load(p)
        temps = f["temps"] if "temps" in f.files else np.array([300.0])
        for i, t in enumerate(temps):
            xs.append(f["pos"][i].astype(np.float64))
            ts.append(np.full(len(xs[-1]), float(t)))
    return np.concatenate(xs, 0), np.concatenate(ts)


def load_frames(paths, temperature_index=0):
    """Frames of one temperature index from each npz file that has it (nm)."""
    xs = []
    for p in paths.split(","):
        pos = np.load(p)["pos"]
        if temperature_index < pos.shape[0]:
            xs.append(pos[temperature_index].astype(np.float64))
    return np.concatenate(xs, 0)


def ladder_at_300k(paths: str, n_frames: int, seed: int) -> np.ndarray:
    """Training frames (nm) at 300 K from every replica: the 300 K frames of files without a ladder (MD) as they
    are, and n_frames drawn from each ladder file's pooled replicas in proportion to their MBAR weights at
    300 K (``training.data.reweight_ladder``), so that hotter replicas add distinct frames without heating the set."""
    from openmm_flowpert.training.data import reweight_ladder

    xs = []
    for p in paths.split(","):
        f = np.load(p)
        if "temps" not in f.files:
            xs.append(f["pos"][0].astype(np.float64))
            continue
        temps = np.repeat(f["temps"].astype(np.float64), f["red"].shape[1])
        u300 = (f["red"].astype(np.float64) * f["temps"][:, None] / 300.0).reshape(-1)   # u_k = U / kT_k
        x, info = reweight_ladder(f["pos"].reshape(-1, *f["pos"].shape[2:]), temps, u300, 300.0, n_frames, seed)
        print(f"{p}: {n_frames} frames at 300 K from {info['distinct']} distinct of {info['frames']} "
              f"(Kish n_eff {info['kish_frames']:.0f})")
        xs.append(x.astype(np.float64))
    return np.concatenate(xs, 0)


def with_basin_frames(x: np.ndarray, data: str, fraction: float) -> np.ndarray:
    """Cover the rare 0 < phi < 2.5 basin: the frames x with the basin's frames of the data files (300 K
    and the next two replicas) appended, repeated until they make up ``fraction`` of the set (the
    recipe: 0.01, about the basin's Boltzmann share; docs/algorithm.md section 17.5). The Metropolis
    test / importance weights correct for the changed proposal density exactly."""
    if fraction <= 0:
        return x
    extra = np.concatenate([load_frames(data, i) for i in (0, 1, 2)], 0)
    extra = extra[in_basin(extra) > 0]
    n_rep = int(fraction * len(x) / max(len(extra), 1))
    return np.concatenate([x] + [extra] * n_rep, 0) if n_rep > 0 else x


def cmd_train(args):
    from openmm_flowpert.energies import ReducedPotential

    s = molecule()
    x = np.concatenate([load_frames(args.data, int(i)) for i in args.replicas.split(",")], 0)
    if args.replicas != "0":
        print(f"training frames: {len(x)} from replicas {args.replicas} (300 K is 0)")
    temps = None
    if args.reweight_ladder:
        x = ladder_at_300k(args.data, args.reweight_ladder, args.seed)
        print(f"training frames: {len(x)} ({100 * in_basin(x).mean():.1f} % in 0 < phi < 2.5)")
    if args.conditioned:  # every replica of every file, each frame with its temperature
        x, temps = all_replicas(args.data)
        print(f"temperature-conditioned: {len(x)} frames at {sorted(set(np.round(temps, 1).tolist()))} K")
    if args.basin_fraction > 0:
        n0 = len(x)
        x = with_basin_frames(x, args.data, args.basin_fraction)
        if temps is not None:  # the basin frames count as 300 K frames, as in the unconditioned recipe
            temps = np.concatenate([temps, np.full(len(x) - n0, 300.0)])
        print(f"training frames: {len(x)} ({100 * in_basin(x).mean():.1f} % in 0 < phi < 2.5)")
    if args.max_frames and len(x) > args.max_frames:
        pick = np.random.default_rng(args.seed).choice(len(x), args.max_frames, replace=False)
        x, temps = x[pick], None if temps is None else temps[pick]
        print(f"training frames: {len(x)} (a random subset)")
    if args.init:  # maximum-likelihood fine-tuning of a trained flow on the same frames
        from openmm_flowpert.training.likelihood import fine_tune_likelihood

        flow = fine_tune_likelihood(fp.PerturbedFlow.load(args.init), x, minutes=args.likelihood_minutes,
                                    batch_size=args.batch, lr=args.likelihood_lr, ema=args.ema, seed=args.seed,
                                    progress=True)
        flow.metadata["recipe"] = " ".join(["python benchmarks/alanine.py"] + sys.argv[1:])
        flow.save(args.out)
        print(json.dumps(flow.metadata["likelihood"], indent=1))
        return
    flow = fp.train_flow(x, topology=None if args.coordinates == "cartesian" else s.topology,
                         coordinates=args.coordinates, hidden=args.hidden, n_layers=args.layers, n_freq=args.n_freq,
                         linear=args.linear, linear_torsions=args.linear_torsions,
                         n_steps=args.steps, grid=args.grid, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                         ema=args.ema, patience=args.epochs, max_minutes=args.minutes, temperature=300.0,
                         seed=args.seed, energy=ReducedPotential(s.system, 300.0), progress=True,
                         likelihood_minutes=args.likelihood_minutes, likelihood_lr=args.likelihood_lr,
                         temperatures=temps)
    flow.metadata["recipe"] = " ".join(["python benchmarks/alanine.py"] + sys.argv[1:])
    flow.save(args.out)
    print(json.dumps(flow.metadata["training"], indent=1))


def cmd_refine(args):
    from openmm_flowpert.energies import ReducedPotential
    from openmm_flowpert.training.importance import refine_by_importance

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = molecule()
    x = load_frames(args.data) if args.data_fraction > 0 else None
    t0 = time.time()
    flow = refine_by_importance(fp.PerturbedFlow.load(args.flow), ReducedPotential(s.system, 300.0), x,
                                rounds=args.rounds, n_proposals=args.n_proposals, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch, ema=args.ema, data_fraction=args.data_fraction,
                                seed=args.seed, progress=False)
    flow.metadata["recipe"] = (flow.metadata.get("recipe", "") + " && python benchmarks/alanine.py "
                               + " ".join(sys.argv[1:]))
    flow.save(args.out)
    print(json.dumps({**flow.metadata["importance"], "wall_s": round(time.time() - t0, 1)}))


def cmd_reverse_kl(args):
    from openmm_flowpert.energies import ReducedPotential
    from openmm_flowpert.training.reverse_kl import fine_tune_reverse_kl

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = molecule()
    x = with_basin_frames(load_frames(args.data), args.data, args.basin_fraction)  # as in 'train'
    print(f"likelihood frames: {len(x)} ({100 * in_basin(x).mean():.1f} % in 0 < phi < 2.5)", flush=True)
    rp = ReducedPotential(s.system, 300.0, n_workers=1)
    flow = fine_tune_reverse_kl(fp.PerturbedFlow.load(args.flow), rp.reduced_energies_and_gradients, x,
                                minutes=args.minutes, kl_weight=args.kl_weight, lr=args.lr, batch_size=args.batch,
                                n_samples=args.samples, ema=args.ema, val_every=args.val_every, seed=args.seed,
                                max_steps=args.max_steps or None, progress=True)
    flow.metadata["recipe"] = (flow.metadata.get("recipe", "") + " && python benchmarks/alanine.py "
                               + " ".join(sys.argv[1:]))
    flow.save(args.out)
    meta = dict(flow.metadata["reverse_kl"])
    print(json.dumps({k: v for k, v in meta.items() if k != "history"}))


def kish(log_w: np.ndarray) -> float:
    from openmm_flowpert.training.importance import kish_fraction
    return kish_fraction(log_w)


def is_estimate(log_w: np.ndarray, f: np.ndarray):
    w = np.exp(log_w - log_w.max())
    p = float((w * f).sum() / w.sum())
    se = float(math.sqrt((w ** 2 * (f - p) ** 2).sum()) / w.sum())
    return p, se


def cmd_measure(args):
    from openmm_flowpert.energies import ReducedPotential

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = molecule()
    rp = ReducedPotential(s.system, 300.0)
    flow = fp.PerturbedFlow.load(args.flow)
    md = load_frames(args.data)
    ref = in_basin(md)
    out = {"flow": args.flow, "coordinates": flow.coordinates, "d": flow.d, "n_steps": flow.n_steps,
           "training": flow.metadata.get("training"), "cpu": cpu_name(), "threads": torch.get_num_threads()}
    out["md_median_u"] = float(np.median(rp(md[:: max(1, len(md) // 2000)])))
    out["re_population_pct"] = [100 * ref.mean(), 100 * block_se(ref)]

    noise = fp.Noise(args.seed)
    n = args.n_exact
    w = noise.gaussian(n, flow.dim)
    t0 = time.time()
    ps = args.prior_scale
    out["prior_scale"] = ps
    x, lq_exact = flow.evaluate(w, torch.zeros(n, 0, flow.dim), estimator="jacobian", prior_scale=ps)
    out["time_exact_per_sample_s"] = (time.time() - t0) / n
    u = rp(x)
    lw_exact = -u - lq_exact.numpy()
    out["proposal_median_u"] = float(np.median(u))
    out["kish_ess_exact_pct"] = 100 * kish(lw_exact)
    out["population_exact_is_pct"] = [100 * v for v in is_estimate(lw_exact, in_basin(x))]
    out["proposal_raw_population_pct"] = 100 * float(in_basin(x).mean())
    for est in ("fp", "fp++"):
        P = flow.n_probe_sets(est)
        eps = noise.gaussian(n, flow.dim, sets=P)
        t0 = time.time()
        _, lq = flow.evaluate(w, eps, estimator=est, prior_scale=ps)
        out[f"time_{est}_per_sample_s"] = (time.time() - t0) / n
        diff = -(lq.numpy() - lq_exact.numpy())
        ok = np.isfinite(diff)
        out[f"logW_{est}_minus_exact"] = {"mean": float(diff[ok].mean()), "std": float(diff[ok].std()),
                                          "p05": float(np.percentile(diff[ok], 5)),
                                          "p95": float(np.percentile(diff[ok], 95))}
        out[f"kish_ess_{est}_pct"] = 100 * kish(np.where(np.isfinite(-u - lq.numpy()), -u - lq.numpy(), -np.inf))

    # Reweighted population from many fp++ proposals (unbiased W, cheaper than exact log-dets)
    lws, fs = [], []
    t0 = time.time()
    for _ in range(args.n_pp // 1000):
        prop = flow.propose(1000, noise, estimator="fp++", prior_scale=ps)
        lw = -rp(prop.x) - prop.log_q.numpy()
        lws.append(np.where(np.isfinite(lw), lw, -np.inf))
        fs.append(in_basin(prop.x))
    lws, fs = np.concatenate(lws), np.concatenate(fs)
    out["population_fpp_is_pct"] = [100 * v for v in is_estimate(lws, fs)]
    out["kish_ess_fpp_many_pct"] = 100 * kish(lws)
    out["n_fpp"] = len(lws)
    out["time_fpp_is_s"] = time.time() - t0

    # Independence Metropolis acceptance, chains started from MD frames (refresh u | x)
    rng = np.random.default_rng(args.seed)
    x0 = md[rng.choice(len(md), args.chains, replace=False)]
    for est in () if args.skip_mc else ("fp", "fp++", "jacobian"):
        t0 = time.time()
        res = fp.run_metropolis(flow, rp, args.chains, args.iters, estimator=est, x0=x0, seed=args.seed + 1,
                                store_positions=False, prior_scale=ps)
        out[f"acceptance_{est}"] = res.acceptance
        out[f"time_mc_{est}_s"] = time.time() - t0
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


def save_weights(path: str, x: list, log_q: list, u: list) -> None:
    """Store proposals for later analysis (``benchmarks/weight_tail.py``), atomically: positions x
    (n, 3N) nm, their exact log q (n,) nats and reduced energies u (n,) kT."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=np.concatenate([np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in x]),
             log_q=np.concatenate(log_q), u=np.concatenate(u))
    os.replace(tmp, path)


def bootstrap_kish(log_w: np.ndarray, n_boot: int = 500, seed: int = 0) -> float:
    """Bootstrap standard error of the Kish ESS fraction of log-weights."""
    rng = np.random.default_rng(seed)
    return float(np.std([kish(log_w[rng.integers(0, len(log_w), len(log_w))]) for _ in range(n_boot)], ddof=1))


def quality(flow, rp, heldout: np.ndarray, n_exact: int, chains: int, iters: int, seed: int,
            x0_pool: np.ndarray, batch: int = 250, prior_scale=None, save: Optional[str] = None) -> dict:
    """The flow-quality figures of the ablation table (docs/benchmarks.md section 6).

    Kish ESS of ``n_exact`` proposals with exact log-dets (bootstrap SE) and the Pareto k of their
    weights' tail (k >= 0.5: Kish's estimate and its bootstrap SE are unreliable), their median reduced energy
    (kT), the negative log-likelihood of held-out frames ``heldout`` (n, N, 3) nm with exact log-dets
    (nats, orientation included: log q of the Haar-rotated proposal density on the mean-free
    subspace), and fp++ independence-Metropolis acceptance of ``chains`` chains x ``iters`` proposals
    started from frames of ``x0_pool``. ``save``: store the exact-log-det proposals there (npz).
    """
    from openmm_flowpert.analysis import pareto_khat

    noise = fp.Noise(seed)
    t0 = time.time()
    xs, lqs, us = [], [], []
    for b0 in range(0, n_exact, batch):
        nb = min(batch, n_exact - b0)
        w = noise.gaussian(nb, flow.dim)
        x, lq = flow.evaluate(w, torch.zeros(nb, 0, flow.dim), estimator="jacobian", prior_scale=prior_scale)
        xs.append(x)
        lqs.append(lq.numpy())
        us.append(rp(x))
    if save:
        save_weights(save, xs, lqs, us)
    us = np.concatenate(us)
    lw = -us - np.concatenate(lqs)
    ok = np.isfinite(lw)
    out = {"n_exact": int(n_exact), "kish_ess_exact_pct": 100 * kish(np.where(ok, lw, -np.inf)),
           "kish_ess_exact_se_pct": 100 * bootstrap_kish(np.where(ok, lw, -np.inf)),
           "pareto_khat_exact": pareto_khat(lw[ok]),
           "proposal_median_u": float(np.median(us)), "time_exact_s": time.time() - t0}
    t0 = time.time()
    nll = []
    for b0 in range(0, len(heldout), batch):
        r = flow.refresh(heldout[b0:b0 + batch], noise, estimator="jacobian", prior_scale=prior_scale)
        nll.append(-r.log_q.numpy())
    nll = np.concatenate(nll)
    okn = np.isfinite(nll)
    out.update({"heldout_nll": float(nll[okn].mean()), "heldout_nll_se": float(nll[okn].std() / math.sqrt(okn.sum())),
                "heldout_n": int(okn.sum()), "heldout_failed": int((~okn).sum()), "time_nll_s": time.time() - t0})
    basin = in_basin(heldout) > 0  # the rare basin apart: proposals' Kish ESS cannot see a flow that misses it
    for key, part in (("basin", basin), ("rest", ~basin)):
        sel = okn & part
        out[f"heldout_nll_{key}"] = float(nll[sel].mean()) if sel.any() else None
        out[f"heldout_n_{key}"] = int(sel.sum())
    out["heldout_nll_basin_max"] = float(nll[okn & basin].max()) if (okn & basin).any() else None
    rng = np.random.default_rng(seed)
    x0 = x0_pool[rng.choice(len(x0_pool), chains, replace=False)]
    t0 = time.time()
    res = fp.run_metropolis(flow, rp, chains, iters, estimator="fp++", x0=x0, seed=seed + 1, store_positions=False,
                            prior_scale=prior_scale)
    out.update({"acceptance_fpp": float(res.acceptance), "time_mc_s": time.time() - t0})
    return out


def cmd_quality(args):
    from openmm_flowpert.energies import ReducedPotential

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = molecule()
    temperature = float(np.load(args.heldout.split(",")[0])["temps"][args.replica])
    rp = ReducedPotential(s.system, temperature)
    flow = fp.PerturbedFlow.load(args.flow).at_temperature(temperature)  # (conditioned flows only)
    held = load_frames(args.heldout, args.replica)
    held = held[:: max(1, len(held) // args.n_heldout)][: args.n_heldout]
    out = {"flow": args.flow, "label": args.label, "training": flow.metadata.get("training"),
           "recipe": flow.metadata.get("recipe"), "n_steps": flow.n_steps, "temperature": temperature}
    out.update(quality(flow, rp, held, args.n_exact, args.chains, args.iters, args.seed, held,
                       prior_scale=args.prior_scale, save=args.save))
    out["prior_scale"] = args.prior_scale
    print(json.dumps(out), flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")


def torsion_histogram_kl(a: np.ndarray, b: np.ndarray, n_bins: int = 72) -> float:
    """KL(a || b) in nats of two samples of angles (rad) on n_bins equal bins of the circle (0.5
    added to every count)."""
    edges = np.linspace(-math.pi, math.pi, n_bins + 1)
    pa = np.histogram(np.remainder(a + math.pi, 2 * math.pi) - math.pi, edges)[0] + 0.5
    pb = np.histogram(np.remainder(b + math.pi, 2 * math.pi) - math.pi, edges)[0] + 0.5
    pa, pb = pa / pa.sum(), pb / pb.sum()
    return float((pa * np.log(pa / pb)).sum())


def cmd_marginals(args):
    """Per torsion: the Z-matrix atoms, how much of the circle the held-out frames fill (emptiest
    smoothed 5-degree bin / uniform) and KL(MD || flow) of each flow's proposals (72 bins)."""
    from openmm_flowpert.flow.molecular import emptiest_bin_density

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    held = torch.as_tensor(load_frames(args.heldout), dtype=torch.float64)
    held = held[torch.randperm(held.shape[0], generator=torch.Generator().manual_seed(0))[:args.n]]
    held = (held - held.mean(1, keepdim=True)).reshape(held.shape[0], -1)
    rows = None
    for path in args.flows.split(","):
        flow = fp.PerturbedFlow.load(path)
        ic = flow.parts()[1].ic

        def torsions(x):
            y = ic.inverse(x.reshape(x.shape[0], -1))[0]
            return torch.cat([y[:, :3], y[:, 6:]], 1)[:, 5::3]

        t_md = torsions(held)
        t_fl = torsions(flow.sample(args.n, seed=args.seed))
        if rows is None:
            dens = emptiest_bin_density(t_md)
            rows = [{"torsion": j, "atoms": ic.zmatrix[j + 3].tolist(), "fill": round(float(dens[j]), 4)}
                    for j in range(t_md.shape[1])]
        for j, r in enumerate(rows):
            r[path] = round(torsion_histogram_kl(t_md[:, j].numpy(), t_fl[:, j].numpy()), 4)
    for r in rows:
        print(json.dumps(r))


def energies_by_force(system, x: np.ndarray) -> dict:
    """Reduced energy (kT at 300 K) of each frame (nm) per force of the system, by force class name."""
    import openmm as mm
    from openmm import unit

    system = mm.XmlSerializer.deserialize(mm.XmlSerializer.serialize(system))
    names = [type(f).__name__ for f in system.getForces()]
    for i, f in enumerate(system.getForces()):
        f.setForceGroup(i)
    ctx = mm.Context(system, mm.VerletIntegrator(1e-3), mm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    kT = (unit.MOLAR_GAS_CONSTANT_R * 300 * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    out = np.zeros((len(x), len(names)))
    for n, xn in enumerate(x):
        ctx.setPositions(xn)
        for g in range(len(names)):
            e = ctx.getState(getEnergy=True, groups={g}).getPotentialEnergy()
            out[n, g] = e.value_in_unit(unit.kilojoule_per_mole) / kT
    return {name: out[:, g] for g, name in enumerate(names)}


def cmd_forces(args):
    """Median energy per force of each flow's proposals minus that of held-out frames (kT)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    system = molecule().system
    held = energies_by_force(system, load_frames(args.heldout)[::4][:args.n])
    for path in args.flows.split(","):
        flow, noise = fp.PerturbedFlow.load(path), fp.Noise(args.seed)
        x = np.concatenate([flow.propose(250, noise).x.reshape(250, -1, 3).numpy() for _ in range(args.n // 250)])
        prop = energies_by_force(system, x)
        diff = {k: round(float(np.median(prop[k]) - np.median(held[k])), 2) for k in held}
        total = float(np.median(sum(prop.values())) - np.median(sum(held.values())))
        print(json.dumps({"flow": path, "median_difference_kT": diff, "total": round(total, 2),
                          "heldout_median_kT": {k: round(float(np.median(v)), 2) for k, v in held.items()}}))


def cmd_cost(args):
    """ms per proposal with its log q (fp++ and fp, exact inverse) of each flow: best of ``repeats``
    batches of ``n`` after one warm-up batch."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for path in args.flows.split(","):
        flow, noise = fp.PerturbedFlow.load(path), fp.Noise(args.seed)
        flow.propose(64, noise, estimator="fp++")
        out = {"flow": path, "d": flow.dim, "batch": args.n, "threads": torch.get_num_threads()}
        for est in ("fp++", "fp"):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                flow.propose(args.n, noise, estimator=est)
                times.append((time.perf_counter() - t0) / args.n)
            out[f"ms_{est}"] = round(1e3 * min(times), 2)
        print(json.dumps(out))


class AveragedVelocity(torch.nn.Module):
    """The mean of several trained velocity fields (same transform): an ensemble as one field."""

    def __init__(self, fields):
        super().__init__()
        self.fields = torch.nn.ModuleList(fields)
        self.dim = fields[0].dim

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(y)
        for v in self.fields:
            out = out + v(t, y)
        return out / len(self.fields)


def load_flow_or_average(spec: str):
    """A flow file, or 'A.pt+B.pt+...': one flow whose velocity is the mean of the files' fields (their
    fixed transforms must be identical, i.e. fitted to the same frames)."""
    flows = [fp.PerturbedFlow.load(p) for p in spec.split("+")]
    if len(flows) == 1:
        return flows[0]
    parts = [f.parts() for f in flows]
    ref = parts[0][1].state_dict()
    for _, tr in parts[1:]:
        if any(not torch.equal(ref[k], v) for k, v in tr.state_dict().items()):
            sys.exit(f"kish: the transforms of {spec} differ; average only flows trained on the same frames")
    return fp.PerturbedFlow.build(AveragedVelocity([v for v, _ in parts]),
                                  torch.tensor(flows[0].info.times, dtype=torch.float64), parts[0][1],
                                  prior_scale=flows[0].prior_scale, temperature=flows[0].info.temperature)


def cmd_kish(args):
    """Kish ESS of n proposals with exact log-dets (bootstrap SE, Pareto k) per flow, on the same noise
    seeds (Noise(seed + b) for the batch starting at b), at a given latent prior scale."""
    from openmm_flowpert.analysis import pareto_khat
    from openmm_flowpert.energies import ReducedPotential

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rp = ReducedPotential(molecule().system, 300.0, n_workers=1)
    specs = args.flows.split(",")
    if args.save and len(specs) != 1:
        sys.exit("kish: --save stores the proposals of one flow; pass one flow with --save")
    for spec in specs:
        flow, t0, xs, lqs, us = load_flow_or_average(spec), time.time(), [], [], []
        for b in range(0, args.n, args.batch):
            p = flow.propose(min(args.batch, args.n - b), fp.Noise(args.seed + b), estimator="jacobian",
                             prior_scale=args.prior_scale)
            xs.append(p.x)
            lqs.append(p.log_q.numpy())
            us.append(rp(p.x))
        if args.save:
            save_weights(args.save, xs, lqs, us)
        lw = -np.concatenate(us) - np.concatenate(lqs)
        lw = np.where(np.isfinite(lw), lw, -np.inf)
        print(json.dumps({"flow": spec, "prior_scale": args.prior_scale, "n": len(lw), "kish": kish(lw),
                          "se": bootstrap_kish(lw, 300), "pareto_k": float(pareto_khat(lw[np.isfinite(lw)])),
                          "wall_s": round(time.time() - t0, 1)}), flush=True)



def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default="alanine-dipeptide", choices=["alanine-dipeptide", "alanine-tetrapeptide"])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--frames", type=int, default=10000)
    d.add_argument("--seed", type=int, default=1)
    md_ = sub.add_parser("md", help="plain 300 K Langevin MD, one frame per 0.2 ps")
    md_.add_argument("--out", required=True)
    md_.add_argument("--frames", type=int, default=100000)
    md_.add_argument("--seed", type=int, default=11)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True, help="npz file(s) from 'data', comma-separated")
    t.add_argument("--out", required=True)
    t.add_argument("--coordinates", default="internal", choices=sorted(fp.flow.TRANSFORMS))
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--layers", type=int, default=3)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--grid", default="quadratic", choices=["quadratic", "uniform"])
    t.add_argument("--n-freq", type=int, default=4)
    t.add_argument("--linear", action="store_true", help="the velocity MLP plus a time-dependent linear map")
    t.add_argument("--linear-torsions", action=argparse.BooleanOptionalAction, default=True,
                   help="with --linear: the linear map includes the torsions (--no-linear-torsions: bonds and angles)")
    t.add_argument("--max-frames", type=int, default=0, help="train on a random subset of this many frames")
    t.add_argument("--likelihood-minutes", type=float, default=0.0,
                   help="maximum-likelihood fine-tuning after flow matching (minutes)")
    t.add_argument("--likelihood-lr", type=float, default=2e-4)
    t.add_argument("--init", help="fine-tune this flow file by maximum likelihood instead of training anew "
                                  "(--likelihood-minutes, --batch, --ema, --likelihood-lr)")
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--minutes", type=float, default=40.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--replicas", default="0",
                   help="replica indices whose frames make the training set, comma-separated (0: 300 K, 1: 331 K, ...)")
    t.add_argument("--conditioned", action="store_true",
                   help="one temperature-conditioned flow on every replica's frames (T0 = 300 K)")
    t.add_argument("--reweight-ladder", type=int, default=0, metavar="N",
                   help="N frames at 300 K resampled from every replica of each replica-exchange file by MBAR "
                        "weights (files without a ladder, MD, are added as they are)")
    t.add_argument("--basin-fraction", type=float, default=0.0,
                   help="repeat frames with 0 < phi < 2.5 until they are this fraction of the training set")
    r = sub.add_parser("refine", help="importance-weighted refinement of a trained flow (its W-resampled proposals)")
    r.add_argument("--flow", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--data", default="", help="npz file(s) whose 300 K frames are mixed in (--data-fraction)")
    r.add_argument("--data-fraction", type=float, default=0.5)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--n-proposals", type=int, default=8192)
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--batch", type=int, default=512)
    r.add_argument("--ema", type=float, default=0.99)
    r.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("reverse-kl", help="fine-tune a trained flow on the reverse KL divergence mixed with the "
                                          "frames' likelihood (OpenMM energies and forces)")
    k.add_argument("--flow", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--data", required=True, help="npz file(s) whose 300 K frames make the likelihood term")
    k.add_argument("--basin-fraction", type=float, default=0.0)
    k.add_argument("--minutes", type=float, default=10.0)
    k.add_argument("--max-steps", type=int, default=0)
    k.add_argument("--kl-weight", type=float, default=0.5)
    k.add_argument("--lr", type=float, default=1e-4)
    k.add_argument("--batch", type=int, default=128, help="data frames per step")
    k.add_argument("--samples", type=int, default=128, help="flow samples per step")
    k.add_argument("--ema", type=float, default=0.99)
    k.add_argument("--val-every", type=int, default=25)
    k.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure")
    m.add_argument("--data", required=True)
    m.add_argument("--flow", required=True)
    m.add_argument("--n-exact", type=int, default=1000)
    m.add_argument("--n-pp", type=int, default=10000)
    m.add_argument("--chains", type=int, default=32)
    m.add_argument("--iters", type=int, default=50)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--prior-scale", type=float, default=None, help="latent prior scale (default: the flow's)")
    m.add_argument("--skip-mc", action="store_true", help="skip the Metropolis acceptance runs")
    m.add_argument("--json")
    q = sub.add_parser("quality", help="the ablation table's figures for one flow")
    q.add_argument("--flow", required=True)
    q.add_argument("--heldout", required=True, help="npz file(s) whose 300 K frames were not trained on")
    q.add_argument("--label", default="")
    q.add_argument("--n-exact", type=int, default=5000)
    q.add_argument("--n-heldout", type=int, default=1000)
    q.add_argument("--chains", type=int, default=32)
    q.add_argument("--iters", type=int, default=30)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--prior-scale", type=float, default=None, help="latent prior scale (default: the flow's)")
    q.add_argument("--replica", type=int, default=0,
                   help="measure at this replica's temperature (its held-out frames, its energies; the flow at "
                        "that temperature if it is temperature-conditioned)")
    q.add_argument("--json", help="append the result as one JSON line")
    q.add_argument("--save", help="store the exact-log-det proposals (x, log_q, u) in this npz file")
    g = sub.add_parser("marginals", help="per torsion: how much of the circle the frames fill, and KL(MD || flow)")
    g.add_argument("--flows", required=True, help="flow files, comma-separated")
    g.add_argument("--heldout", required=True, help="npz file(s) whose 300 K frames are the reference")
    g.add_argument("--n", type=int, default=20000, help="frames and proposals per flow")
    g.add_argument("--seed", type=int, default=3)
    c = sub.add_parser("cost", help="ms per fp++ / fp proposal of each flow")
    c.add_argument("--flows", required=True, help="flow files, comma-separated")
    c.add_argument("--n", type=int, default=256)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("forces", help="proposals' excess energy per force against held-out frames (median, kT)")
    g.add_argument("--flows", required=True, help="flow files, comma-separated")
    g.add_argument("--heldout", required=True, help="npz file whose 300 K frames (every 4th) are the reference")
    g.add_argument("--n", type=int, default=1000, help="proposals and held-out frames (a multiple of 250)")
    g.add_argument("--seed", type=int, default=3, help="noise seed of the proposals")
    e = sub.add_parser("kish", help="Kish ESS with exact log-dets of flows (A.pt+B.pt: their fields averaged)")
    e.add_argument("--flows", required=True, help="flow files, comma-separated; '+' averages fields")
    e.add_argument("--n", type=int, default=3000)
    e.add_argument("--batch", type=int, default=250)
    e.add_argument("--prior-scale", type=float, default=None, help="latent prior scale (default: the flow's)")
    e.add_argument("--seed", type=int, default=100, help="noise seed of the first batch")
    e.add_argument("--save", help="store the proposals (x, log_q, u) of the one flow in this npz file "
                                  "(for benchmarks/weight_tail.py)")
    args = p.parse_args()
    SYSTEM["name"] = args.system
    {"data": cmd_data, "md": cmd_md, "train": cmd_train, "measure": cmd_measure, "refine": cmd_refine,
     "reverse-kl": cmd_reverse_kl, "quality": cmd_quality, "marginals": cmd_marginals, "cost": cmd_cost,
     "kish": cmd_kish, "forces": cmd_forces}[args.cmd](args)


if __name__ == "__main__":
    main()
