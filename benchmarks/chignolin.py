"""CPU costs of the CLN025 pipeline's pieces, and the projected wall time of the full protocol.

    python benchmarks/chignolin.py [--threads 1] [--out chignolin-costs.json]

Measures (one process, ``--threads`` OpenMM/torch threads): reduced energy per configuration
(ReducedPotential, batches of 1 and 64) with the native GBSAOBCForce and with implicit/obc2.xml;
Langevin MD per step; one flow pass (sample), one fp weight and one fp++ weight per configuration,
and the move's refresh of one state (exact inverse),
for the internal-coordinate flow (d = 492) and the Cartesian flow (d = 495) at the network sizes of
``flowpert chignolin --scale full`` (untrained weights: the cost does not depend on them).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import timings  # noqa: E402


def _best(fn, repeats=3):
    return min(timings(fn, repeats))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import openmm
    from openmm import unit

    import openmm_flowpert as fp
    from openmm_flowpert.cli.chignolin import PRESETS
    from openmm_flowpert.energies import ReducedPotential
    from openmm_flowpert.noise import Noise
    from openmm_flowpert.systems import cln025

    res = {"threads": args.threads, "batch": args.batch}
    B = args.batch
    ms = cln025("implicit")
    rng = np.random.default_rng(0)
    xb = ms.positions[None] + 0.003 * rng.normal(size=(B,) + ms.positions.shape)
    for gb in ("native", "custom"):
        s = cln025("implicit", gb=gb)
        rp = ReducedPotential(s.system, 300.0, platform="CPU", n_workers=1,
                              platform_properties={"Threads": str(args.threads)})
        res[f"energy_ms_{gb}_batch1"] = 1e3 * _best(lambda: rp(xb[:1]))
        res[f"energy_ms_{gb}_per_config_batch{B}"] = 1e3 * _best(lambda: rp(xb)) / B
        integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.001 * unit.picosecond)
        ctx = openmm.Context(s.system, integ, openmm.Platform.getPlatformByName("CPU"), {"Threads": str(args.threads)})
        ctx.setPositions(ms.positions * unit.nanometer)
        openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
        res[f"md_ms_per_step_{gb}"] = 1e3 * _best(lambda: integ.step(500), 2) / 500

    x = torch.as_tensor(xb.repeat(4, 0) + 0.002 * rng.normal(size=(4 * B,) + ms.positions.shape))
    for kind in ("internal", "cartesian"):
        cfg = dict(PRESETS["full"][kind])
        cfg["epochs"] = 1
        flow = fp.train_flow(x, topology=ms.topology if kind == "internal" else None, coordinates=kind,
                             progress=False, **cfg)
        noise = Noise(1)
        w = noise.gaussian(B, flow.dim)
        row = {"d": flow.d, "hidden": cfg["hidden"], "n_layers": cfg["n_layers"], "n_steps": cfg["n_steps"]}
        row["sample_ms_per_config"] = 1e3 * _best(lambda: flow.sample(B, seed=2)) / B
        for est in ("fp", "fp++"):
            P = flow.n_probe_sets(est)
            eps = noise.gaussian(B, flow.dim, sets=P)
            row[f"{est}_weight_ms_per_config"] = 1e3 * _best(lambda: flow.evaluate(w, eps, est)) / B
        # the move's Gibbs refresh of one state (exact inverse of the discrete flow by fixed point)
        x1 = flow.sample(1, seed=3)
        row["refresh_fp++_ms_one_state"] = 1e3 * _best(lambda: flow.refresh(x1, Noise(4), estimator="fp++"), 2)
        res[f"flow_{kind}"] = row
        print(kind, row, flush=True)

    # Projection of the full protocol (see docs/benchmarks.md section 9 for the assumptions).
    full = PRESETS["full"]
    n_rep = int(full["temperatures"].split(":")[2])
    md_steps_data = full["re_iterations"] * full["re_md_steps"] * n_rep
    smc_evals = full["smc"]["n_walkers"] * full["smc"]["n_annealing_steps"] * full["smc"]["sweeps"]
    rex_steps = full["rex"]["iterations"] * full["rex"]["md_steps"] * n_rep
    rex_flow = full["rex"]["iterations"] * full["rex"]["proposals"] * n_rep
    rex_calls = full["rex"]["iterations"] * n_rep
    fi = res["flow_internal"]
    cpu = {"data_replica_exchange_h": md_steps_data * res["md_ms_per_step_native"] / 3.6e6,
           "smc_h": smc_evals * (fi["fp_weight_ms_per_config"] + res[f"energy_ms_native_per_config_batch{B}"]) / 3.6e6,
           "hybrid_rex_h": (rex_steps * res["md_ms_per_step_native"]
                            + rex_flow * (fi["fp++_weight_ms_per_config"] + res["energy_ms_native_batch1"])) / 3.6e6}
    res["full_protocol_cpu_core_hours"] = cpu
    res["full_protocol_counts"] = {"md_steps_data": md_steps_data, "smc_weight_evaluations": smc_evals,
                                   "rex_md_steps": rex_steps, "rex_flow_proposals": rex_flow,
                                   "rex_move_calls": rex_calls}
    print(json.dumps(res, indent=1))
    if args.out:
        from openmm_flowpert._files import atomic_write

        atomic_write(args.out, lambda tmp: open(tmp, "w").write(json.dumps(res, indent=1)), suffix=".json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
