"""``flowpert simulate``: training data by Langevin MD or temperature replica exchange (openmmtools).

Writes OUT (a .dcd trajectory of the first, i.e. target, temperature), OUT's .pdb topology and a
.json summary; with several temperatures also one trajectory per temperature (OUT_T<k>.dcd). The
run is stored in OUT's .nc file (openmmtools storage, one frame per iteration): running the same
command again resumes an interrupted run from there.
"""
from __future__ import annotations

import argparse
import os
import time


def parse_temperatures(text: str):
    """'300' | '300,350,400' | '300:600:8' (8 temperatures spaced geometrically) -> list of K."""
    from ..samplers.replica_exchange import geometric_temperatures

    if ":" in text:
        lo, hi, n = text.split(":")
        return geometric_temperatures(float(lo), float(hi), int(n))
    temps = [float(t) for t in text.split(",") if t.strip()]
    if not temps or any(t <= 0 for t in temps):
        raise ValueError(f"bad temperatures {text!r}; use e.g. 300, 300,350,400 or 300:600:8 (K)")
    return temps


def add_system_arguments(p) -> None:
    p.add_argument("--system", default="alanine-dipeptide",
                   help="built-in name (alanine-dipeptide, alanine-dipeptide-implicit, cln025, cln025-vacuum, "
                        "gmm-12d), a .pdb file (with --forcefield) or FILE.prmtop:FILE.inpcrd")
    p.add_argument("--forcefield", nargs="+", default=None,
                   help="OpenMM force-field files for a .pdb system (default amber14-all.xml implicit/obc2.xml)")


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="generate training data with MD or replica exchange",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_system_arguments(p)
    p.add_argument("--out", required=True, help="output trajectory (.dcd)")
    p.add_argument("--temperature", "--temperatures", dest="temperatures", default="300",
                   help="K: one value for MD, or a list / LO:HI:N for replica exchange (first = target)")
    p.add_argument("--ns", type=float, default=1.0, help="simulated time per replica (ns)")
    p.add_argument("--frame-ps", type=float, default=0.5, help="ps between frames (and between swaps)")
    p.add_argument("--timestep-fs", type=float, default=1.0, help="Langevin time step (fs)")
    p.add_argument("--friction", type=float, default=1.0, help="Langevin friction (1/ps)")
    p.add_argument("--equilibration-ps", type=float, default=100.0, help="discarded equilibration (ps)")
    p.add_argument("--platform", default="Reference", help="OpenMM platform")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..samplers.replica_exchange import run_replica_exchange
    from ..systems import get_system
    from ._io import write_json, write_trajectory

    temps = parse_temperatures(args.temperatures)
    ms = get_system(args.system, args.forcefield)
    steps = max(1, int(round(args.frame_ps * 1000.0 / args.timestep_fs)))
    n_frames = max(1, int(round(args.ns * 1000.0 / args.frame_ps)))
    eq = int(round(args.equilibration_ps / args.frame_ps))
    print(f"{ms.name}: {ms.n_atoms} atoms; {len(temps)} temperature(s) {', '.join(f'{t:.1f}' for t in temps)} K; "
          f"{n_frames} frames every {args.frame_ps} ps")
    t0 = time.time()
    storage = os.path.splitext(args.out)[0] + ".nc"
    res = run_replica_exchange(ms.system, ms.positions, temps, eq + n_frames, storage, md_steps=steps,
                               timestep_fs=args.timestep_fs, friction=args.friction, seed=args.seed,
                               platform=args.platform, discard=eq, read_states=range(len(temps)),
                               desc="MD" if len(temps) == 1 else "replica exchange")
    if res is None:
        return 0   # not MPI rank 0
    wall = time.time() - t0
    times = args.frame_ps * np.arange(1, n_frames + 1)
    top = write_trajectory(args.out, res.positions[0], ms.topology, times)
    outs = [args.out]
    if len(temps) > 1:
        base, ext = os.path.splitext(args.out)
        for k in range(1, len(temps)):
            outs.append(f"{base}_T{k}{ext}")
            write_trajectory(outs[-1], res.positions[k], ms.topology, times)
    write_json(os.path.splitext(args.out)[0] + ".json", {
        "system": ms.name, "temperatures_K": temps, "trajectories": outs, "topology": top, "n_frames": n_frames,
        "frame_ps": args.frame_ps, "timestep_fs": args.timestep_fs, "friction_per_ps": args.friction,
        "swap_acceptance": res.swap_acceptance.tolist() if len(temps) > 1 else None, "wall_time_s": wall,
        "seed": args.seed, "storage": storage})
    print(f"wrote {args.out} (+ {top}) in {wall:.0f} s")
    if len(temps) > 1:
        print(f"swap acceptance: {np.round(res.swap_acceptance, 2).tolist()}")
    return 0
