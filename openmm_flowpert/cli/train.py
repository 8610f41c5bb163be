"""``flowpert train``: a flow from a trajectory by flow matching (internal coordinates for molecules).

Checkpoints go to OUT.ckpt; running the same command again after an interruption resumes from it
(``--restart`` starts over). With ``--system`` the flow is validated by the median reduced energy of
its proposals against the training frames.
"""
from __future__ import annotations

import argparse
import json
import os

from . import _args
from .simulate import add_system_arguments


_Help = _args.HelpFormatter  # former name

#: Checks of the training options (argparse types), by TrainingConfig field.
_TYPES = {"hidden": _args.positive_int, "n_layers": _args.positive_int, "n_freq": _args.nonnegative_int,
          "n_steps": _args.positive_int, "epochs": _args.positive_int, "batch_size": _args.positive_int,
          "lr": _args.positive_float, "weight_decay": _args.nonnegative_float, "ema": _args.unit_interval,
          "validation_fraction": _args.fraction, "patience": _args.positive_int, "minutes": _args.positive_float,
          "prior_scale": _args.positive_float, "seed": _args.seed}


def add_training_arguments(p) -> None:
    """One option per :class:`~openmm_flowpert.training.TrainingConfig` field (``n_layers`` ->
    ``--n-layers``), with its default and help; former spellings (``--layers``, ``--batch``,
    ``--steps``) still work but are not listed."""
    from ..training import TrainingConfig

    g = p.add_argument_group("training (the defaults of openmm_flowpert.train_flow)")
    for name, spec in TrainingConfig.help().items():
        typ = _TYPES.get(name, spec["type"])
        kw = dict(type=typ, default=spec["default"], help=spec["help"])
        if typ is bool:  # a switch: --linear / --no-linear
            kw = dict(action=argparse.BooleanOptionalAction, default=spec["default"], help=spec["help"])
        if "choices" in spec:
            kw["choices"] = spec["choices"]
        g.add_argument("--" + name.replace("_", "-"), dest=name, **kw)
        for alias in spec.get("aliases", ()):
            g.add_argument(alias, dest=name, type=typ, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_parser(sub) -> None:
    from ..flow import TRANSFORMS

    p = sub.add_parser("train", help="train a flow on a trajectory", description=__doc__,
                       formatter_class=_args.HelpFormatter)
    p.add_argument("--data", required=True, nargs="+", help="trajectory file(s), any format mdtraj reads")
    p.add_argument("--top", default=None, help="topology for the trajectory (default: the .pdb next to it)")
    p.add_argument("--select", default=None, help="mdtraj atom selection, e.g. 'protein' to strip solvent "
                                                   "(default: all atoms)")
    p.add_argument("--stride", type=_args.positive_int, default=1, help="use every n-th frame")
    p.add_argument("--out", required=True, help="flow file (.pt)")
    add_system_arguments(p)
    p.add_argument("--no-validate", action="store_true", help="skip the proposal-energy validation")
    p.add_argument("--temperature", type=_args.positive_float, default=300.0,
                   help="K of the training data (for validation); with --data-temperatures the reference "
                        "temperature T0 at which the flow file is; with --reweight the temperature the frames are "
                        "pooled at")
    p.add_argument("--data-temperatures", type=_args.positive_float, nargs="+", default=None, metavar="K",
                   help="temperature (K) of each --data file, one per file (e.g. the replicas of a replica-exchange "
                        "run): trains one temperature-conditioned flow on all of them, which FlowPerturbationMove "
                        "uses at each thermodynamic state's temperature")
    p.add_argument("--reweight", action="store_true",
                   help="with --data-temperatures: pool every file's frames at --temperature by their MBAR weights "
                        "(energies from --system) and resample as many frames, for one flow at --temperature instead "
                        "of a temperature-conditioned one; the hotter replicas add distinct frames without heating "
                        "the proposals")
    p.add_argument("--rare-region", default=None, metavar="ANGLE:LOW:HIGH",
                   help="a rare state by one dihedral's range in rad: phi:0:2.5 (backbone phi of any residue: alanine "
                        "dipeptide's left-handed basin), psi:LOW:HIGH, or four 0-based atom indices, 4-6-8-14:LOW:HIGH "
                        "(LOW > HIGH wraps through +-pi); its frames are repeated to --rare-share of the training set")
    p.add_argument("--rare-share", type=_args.positive_float, default=None, metavar="F",
                   help="fraction (0 < F < 1) of the training frames in --rare-region, best about the state's "
                        "Boltzmann share (alanine dipeptide at 300 K: 0.01): the flow proposes the state about that "
                        "often; the weights correct any share exactly")
    p.add_argument("--coordinates", default="internal-cdf", choices=sorted(TRANSFORMS),
                   help="the flow's fixed transform: internal coordinates from the topology's bonds with each "
                        "torsion mapped to the line by its own data marginal (internal-cdf); the same with the "
                        "torsions that rotate freely kept on the circle (a periodic velocity field, a uniform prior: "
                        "internal-circle) or every torsion on the circle (internal-torus); a tanh map of torsions "
                        "(internal); or mean-free Cartesians")
    p.add_argument("--device", type=_args.device, default="cpu", help="torch device of the training (cpu or cuda)")
    p.add_argument("--restart", action="store_true", help="delete this run's checkpoint (OUT.ckpt) and start over, "
                                                          "instead of resuming it")
    add_training_arguments(p)
    p.set_defaults(func=run, interrupt_hint="run the same command again to resume from its checkpoint (OUT.ckpt)")


_RESTART = "Rerun with --restart to start over (deletes the checkpoint), or choose a new --out"


def check(args) -> dict:
    """Every check before reading the data: output paths, input files, training settings (raises
    InputError). Returns the training hyperparameters."""
    from ..training import TrainingConfig

    _args.output_file(args.out, extensions=(".pt",), companions=[args.out + ".ckpt"], what="flow file")
    for path in args.data:
        _args.input_file(path, "--data")
        if os.path.abspath(path) == os.path.abspath(args.out):
            raise _args.InputError(f"--out {args.out!r} is also a --data file; choose another --out")
    if args.data_temperatures is not None and len(args.data_temperatures) != len(args.data):
        raise _args.InputError(f"--data-temperatures gives {len(args.data_temperatures)} temperature(s) for "
                               f"{len(args.data)} --data file(s); give one temperature (K) per file")
    if args.reweight and args.data_temperatures is None:
        raise _args.InputError("--reweight pools frames drawn at several temperatures; give --data-temperatures "
                               "(K), one per --data file")
    if args.top is not None:
        _args.input_file(args.top, "--top")
    rare_region(args)
    if _needs_system(args):
        _args.check_system(args.system)
    hyper = {name: getattr(args, name) for name in TrainingConfig.help()}
    TrainingConfig(**hyper)  # the library's own checks, before any work
    if not args.restart:
        _check_checkpoint(args.out + ".ckpt", hyper)
    return hyper


def _needs_system(args) -> bool:
    """Whether the run evaluates --system's energies: the proposal validation, or --reweight's weights."""
    return bool(args.system) and (args.reweight or not args.no_validate)


def rare_region(args):
    """The checked --rare-region (an analysis.DihedralRegion) or None; raises InputError."""
    from ..analysis import DihedralRegion

    if (args.rare_region is None) != (args.rare_share is None):
        raise _args.InputError("--rare-region and --rare-share go together; give both (e.g. --rare-region phi:0:2.5 "
                               "--rare-share 0.01) or neither")
    if args.rare_region is None:
        return None
    if not args.rare_share < 1:
        raise _args.InputError(f"--rare-share must be a fraction below 1, got {args.rare_share:g}")
    try:
        return DihedralRegion.parse(args.rare_region)
    except ValueError as exc:
        raise _args.InputError(f"--rare-region: {exc}") from None


def with_rare_frames(args, x, top, temps):
    """The frames with --rare-region's repeated to --rare-share (unchanged without the options), their
    temperatures, and the repeat's info for the flow's metadata (None without). Raises InputError."""
    from ..training.data import repeat_to_share

    region = rare_region(args)
    if region is None:
        return x, temps, None
    try:
        inside = region.fraction(x, top) > 0
        x, temps, info = repeat_to_share(x, inside, args.rare_share, temps)
    except ValueError as exc:
        raise _args.InputError(f"--rare-region {args.rare_region}: {exc}") from None
    print(f"--rare-region {args.rare_region}: {info['region_frames']} of {info['frames']} frames, repeated "
          f"{info['copies']} more time(s): {100 * info['share']:.2f} % of {len(x)} training frames")
    return x, temps, dict(info, region=args.rare_region)


def reweighted(args, x, temps, energy):
    """With --reweight: the frames (nm) pooled at --temperature by their MBAR weights from ``energy``
    (a ReducedPotential at --temperature) and resampled, as many as given (temperatures None: one flow
    at --temperature), and the info for the flow's metadata. Without: the arguments unchanged and None.
    Raises InputError."""
    if not args.reweight:
        return x, temps, None
    import numpy as np

    from ..training.data import reweight_ladder

    u = energy(x)
    finite = np.isfinite(u)
    if not finite.any():
        raise _args.InputError(f"--reweight: no frame has a finite energy in --system {args.system}; check that "
                               "the trajectories belong to that system")
    if not finite.all():
        print(f"--reweight: {int((~finite).sum())} frame(s) with a non-finite energy left out")
    x, u, temps = x[finite], u[finite], temps[finite]
    x, info = reweight_ladder(x, temps, u, args.temperature, seed=args.seed)
    print(f"--reweight: {info['frames']} frames at {len(info['share'])} temperature(s) pooled at "
          f"{args.temperature:g} K: {info['distinct']} distinct frames drawn, Kish size {info['kish_frames']:.0f}")
    info["share"] = {f"{k:g} K": v for k, v in info["share"].items()}
    return x, None, info


def _check_checkpoint(ckpt: str, hyper: dict) -> None:
    """A checkpoint to resume must be a training run with the requested settings (checked before the
    data are read; the library checks the data dimension again)."""
    if not os.path.isfile(ckpt):
        return
    import torch

    from ..training import TrainingConfig
    from ..training.trainer import run_settings

    try:
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        stored = dict(ck["config"]) if ck.get("kind") == "training" else None
    except Exception as exc:
        raise _args.InputError(f"training checkpoint {ckpt!r} cannot be read ({type(exc).__name__}). "
                               f"{_RESTART}") from None
    if stored is None:
        raise _args.InputError(f"{ckpt!r} is not a training checkpoint of this version. {_RESTART}")
    wanted = run_settings(TrainingConfig(**hyper))
    # None (the default of --linear) is resolved by the library when training starts; it checks the resolved value
    diff = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in wanted.items()
            if v is not None and stored.get(k) != v]
    if diff:
        raise _args.InputError(f"training checkpoint {ckpt!r} holds a run with other settings ({'; '.join(diff)}); "
                               f"resume it with the same settings. {_RESTART}")


def read_data(args):
    """The frames of every --data file (positions in nm), their topology and, with
    --data-temperatures, each frame's temperature (K; else None). Raises InputError."""
    import numpy as np

    from ._io import read_trajectory

    frames, top = [], None
    for path in args.data:
        x, t = read_trajectory(path, args.top, args.select, args.stride)
        if top is not None and t.n_atoms != top.n_atoms:
            raise _args.InputError(f"{path} has {t.n_atoms} atoms, the first trajectory {top.n_atoms}")
        frames.append(x)
        top = t
    x = np.concatenate(frames, 0)
    n_val = max(1, int(round(args.validation_fraction * len(x)))) if args.validation_fraction > 0 else 0
    if len(x) - n_val < 1:
        raise _args.InputError(f"{len(x)} frame(s) after --stride {args.stride} leave none for training (validation "
                               f"takes {n_val}); give more data or a smaller --stride")
    temps = None
    if getattr(args, "data_temperatures", None):
        temps = np.concatenate([np.full(len(f), t) for f, t in zip(frames, args.data_temperatures)])
    return x, top, temps


def run(args) -> int:
    import openmm_flowpert as fp

    hyper = check(args)
    energy = None
    ms = None
    if _needs_system(args):
        ms = _args.load_system(args.system, args.forcefield)
    x, top, temps = read_data(args)
    print(f"{len(x)} frames of {top.n_atoms} atoms")
    if ms is not None and ms.n_atoms != top.n_atoms:
        fix = "" if args.reweight else " or --no-validate"
        raise _args.InputError(f"--system {args.system} has {ms.n_atoms} atoms but the trajectory has "
                               f"{top.n_atoms}; pass the matching system{fix}")
    if ms is not None:
        from ..energies import ReducedPotential

        energy = ReducedPotential(ms.system, args.temperature)
    x, temps, pooled = reweighted(args, x, temps, energy)
    x, temps, rare = with_rare_frames(args, x, top, temps)
    if args.no_validate:
        energy = None
    ckpt = args.out + ".ckpt"
    args.interrupt_hint = f"run the same command again to resume from the last checkpoint in {ckpt}"
    if args.restart:
        _args.remove_run_files([ckpt])
    elif os.path.exists(ckpt):
        print(f"resuming from {ckpt}")
    with _args.created_folders(os.path.dirname(args.out)):
        with _args.restart_hint([ckpt], _RESTART):
            flow = fp.train_flow(x, topology=top.to_openmm(), coordinates=args.coordinates,
                                 temperature=args.temperature, temperatures=temps, energy=energy,
                                 checkpoint=ckpt, progress=True,
                                 device=args.device, **hyper)
        if pooled is not None:
            flow.metadata["training"]["reweighted"] = pooled
        if rare is not None:
            flow.metadata["training"]["rare_region"] = rare
        flow.save(args.out)
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    info = flow.metadata["training"]
    print(json.dumps(info, indent=1))
    if "proposal_median_energy" in info:
        print(f"median reduced energy: proposals {info['proposal_median_energy']:.1f} kT, "
              f"training frames {info['data_median_energy']:.1f} kT")
    print(f"wrote {args.out}")
    return 0
