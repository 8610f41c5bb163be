"""``flowpert simulate``: training data by Langevin MD or temperature replica exchange (openmmtools).

Writes OUT (a .dcd trajectory of the first, i.e. target, temperature), OUT's .pdb topology and a
.json summary; with several temperatures also one trajectory per temperature (OUT_T<k>.dcd). The
run is stored in OUT's .nc file (openmmtools storage, one frame per iteration): running the same
command again resumes an interrupted run from there (``--restart`` starts over).
"""
from __future__ import annotations

import os
import time

from . import _args

#: Trajectory formats of --out (.nc is the run's storage; .h5 needs PyTables).
FORMATS = (".dcd", ".xtc", ".h5")


def parse_temperatures(text: str):
    """'300' | '300,350,400' | '300:600:8' (8 temperatures spaced geometrically) -> list of K."""
    return _args.parse_temperatures(text)


def add_system_arguments(p) -> None:
    from ..systems import SYSTEMS

    p.add_argument("--system", default="alanine-dipeptide",
                   help=f"built-in name ({', '.join(SYSTEMS)}), a .pdb file (with --forcefield) or "
                        "FILE.prmtop:FILE.inpcrd")
    p.add_argument("--forcefield", nargs="+", default=None,
                   help="OpenMM force-field files for a .pdb system (default: amber14-all.xml implicit/obc2.xml)")


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="generate training data with MD or replica exchange",
                       description=__doc__, formatter_class=_args.HelpFormatter)
    add_system_arguments(p)
    p.add_argument("--out", required=True, help="output trajectory (.dcd or .xtc; .h5 with PyTables)")
    p.add_argument("--temperature", "--temperatures", dest="temperatures", default="300", type=_args.temperatures,
                   help="K: one value for MD, or a list / LO:HI:N for replica exchange (first = target)")
    p.add_argument("--ns", type=_args.positive_float, default=1.0, help="simulated time per replica (ns)")
    p.add_argument("--frame-ps", type=_args.positive_float, default=0.5,
                   help="ps between frames (and between swaps)")
    p.add_argument("--timestep-fs", type=_args.positive_float, default=1.0, help="Langevin time step (fs)")
    p.add_argument("--friction", type=_args.positive_float, default=1.0, help="Langevin friction (1/ps)")
    p.add_argument("--equilibration-ps", type=_args.nonnegative_float, default=100.0,
                   help="discarded equilibration (ps)")
    p.add_argument("--platform", type=_args.platform, default="Reference", help="OpenMM platform")
    p.add_argument("--seed", type=_args.seed, default=0, help="seed of the Langevin noise and the swaps")
    p.add_argument("--restart", action="store_true",
                   help="delete this run's storage (OUT's .nc files) and start over, instead of resuming it")
    p.set_defaults(func=run, interrupt_hint="run the same command again to resume from its storage (OUT's .nc file)")


_RESTART = "Rerun with --restart to start over (deletes the stored run), or choose a new --out"


def storage_files(out: str):
    """The run's openmmtools storage next to OUT and the checkpoint file openmmtools keeps beside it."""
    base = os.path.splitext(out)[0]
    return base + ".nc", base + "_checkpoint.nc"


def check(args):
    """Every check before the run: temperatures, sizes, output paths (raises InputError).
    Returns (temperatures, MD steps per frame, frames, equilibration frames)."""
    temps = args.temperatures if isinstance(args.temperatures, list) else parse_temperatures(args.temperatures)
    steps = int(round(args.frame_ps * 1000.0 / args.timestep_fs))
    if steps < 1:
        raise _args.InputError(f"--frame-ps {args.frame_ps:g} is shorter than one --timestep-fs "
                               f"({args.timestep_fs:g} fs); give a longer --frame-ps")
    n_frames = int(round(args.ns * 1000.0 / args.frame_ps))
    if n_frames < 1:
        raise _args.InputError(f"--ns {args.ns:g} is shorter than one frame (--frame-ps {args.frame_ps:g}); give "
                               "a longer --ns or a shorter --frame-ps")
    eq = int(round(args.equilibration_ps / args.frame_ps))
    ext = os.path.splitext(args.out)[1].lower()
    if ext == ".nc":
        raise _args.InputError(f"--out {args.out!r}: the .nc name is this run's storage; name the trajectory "
                               f"{os.path.splitext(args.out)[0] + '.dcd'!r}")
    if ext == ".h5":
        try:
            import tables  # noqa: F401
        except ImportError:
            raise _args.InputError(f"--out {args.out!r}: .h5 trajectories need PyTables (pip install tables); "
                                   "or use a .dcd name") from None
    base = os.path.splitext(args.out)[0]
    companions = [base + ".pdb", base + ".json", *storage_files(args.out)]
    companions += [f"{base}_T{k}{ext}" for k in range(1, len(temps))]
    _args.output_file(args.out, extensions=FORMATS, companions=companions, what="trajectory")
    _args.check_system(args.system)
    return temps, steps, n_frames, eq


def run(args) -> int:
    temps, steps, n_frames, eq = check(args)
    ms = _args.load_system(args.system, args.forcefield)
    storage, checkpoint = storage_files(args.out)
    args.interrupt_hint = f"run the same command again to resume from {storage}"
    if args.restart:
        _args.remove_run_files([storage, checkpoint])
    else:
        with _args.restart_hint([storage], _RESTART):
            _args.check_storage(storage, ms.system, temps, md_steps=steps, timestep_fs=args.timestep_fs,
                                friction=args.friction, seed=args.seed)
    with _args.created_folders(os.path.dirname(args.out)):
        return _run(args, ms, temps, steps, n_frames, eq, storage)


def _run(args, ms, temps, steps, n_frames, eq, storage) -> int:
    import numpy as np

    from ..samplers.replica_exchange import run_replica_exchange
    from ._io import write_json, write_trajectory

    print(f"{ms.name}: {ms.n_atoms} atoms; {len(temps)} temperature(s) {', '.join(f'{t:.1f}' for t in temps)} K; "
          f"{n_frames} frames every {args.frame_ps} ps")
    if os.path.exists(storage):
        print(f"resuming from {storage}")
    t0 = time.time()
    with _args.restart_hint([storage], _RESTART):
        res = run_replica_exchange(ms.system, ms.positions, temps, eq + n_frames, storage, md_steps=steps,
                                   timestep_fs=args.timestep_fs, friction=args.friction, seed=args.seed,
                                   platform=args.platform, discard=eq, read_states=range(len(temps)),
                                   desc="MD" if len(temps) == 1 else "replica exchange")
    if res is None:
        return 0   # not MPI rank 0
    wall = time.time() - t0
    if len(res.positions[0]) > n_frames:  # the storage holds a longer run: write the frames asked for
        print(f"{storage} holds {len(res.positions[0])} frames; writing the first {n_frames}")
    times = args.frame_ps * np.arange(1, n_frames + 1)
    top = write_trajectory(args.out, res.positions[0][:n_frames], ms.topology, times)
    outs = [args.out]
    if len(temps) > 1:
        base, ext = os.path.splitext(args.out)
        for k in range(1, len(temps)):
            outs.append(f"{base}_T{k}{ext}")
            write_trajectory(outs[-1], res.positions[k][:n_frames], ms.topology, times)
    write_json(os.path.splitext(args.out)[0] + ".json", {
        "system": ms.name, "temperatures_K": temps, "trajectories": outs, "topology": top, "n_frames": n_frames,
        "frame_ps": args.frame_ps, "timestep_fs": args.timestep_fs, "friction_per_ps": args.friction,
        "swap_acceptance": res.swap_acceptance.tolist() if len(temps) > 1 else None, "wall_time_s": wall,
        "seed": args.seed, "storage": storage})
    print(f"wrote {args.out} (+ {top}) in {wall:.0f} s")
    if len(temps) > 1:
        print(f"swap acceptance: {np.round(res.swap_acceptance, 2).tolist()}")
    return 0
