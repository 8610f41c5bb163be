"""``flowpert train``: a flow from a trajectory by flow matching (internal coordinates for molecules).

Checkpoints go to OUT.ckpt; running the same command again after an interruption resumes from it
(``--restart`` starts over). With ``--system`` the flow is validated by the median reduced energy of
its proposals against the training frames.
"""
from __future__ import annotations

import argparse
import json
import os

from .simulate import add_system_arguments


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each option's help, except where there is no default (None):
    such options say what happens without them in their help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_training_arguments(p) -> None:
    """One option per :class:`~openmm_flowpert.training.TrainingConfig` field (``n_layers`` ->
    ``--n-layers``), with its default and help; former spellings (``--layers``, ``--batch``,
    ``--steps``) still work but are not listed."""
    from ..training import TrainingConfig

    g = p.add_argument_group("training (the defaults of openmm_flowpert.train_flow)")
    for name, spec in TrainingConfig.help().items():
        kw = dict(type=spec["type"], default=spec["default"], help=spec["help"])
        if "choices" in spec:
            kw["choices"] = spec["choices"]
        g.add_argument("--" + name.replace("_", "-"), dest=name, **kw)
        for alias in spec.get("aliases", ()):
            g.add_argument(alias, dest=name, type=spec["type"], default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_parser(sub) -> None:
    from ..flow import TRANSFORMS

    p = sub.add_parser("train", help="train a flow on a trajectory", description=__doc__, formatter_class=_Help)
    p.add_argument("--data", required=True, nargs="+", help="trajectory file(s), any format mdtraj reads")
    p.add_argument("--top", default=None, help="topology for the trajectory (default: the .pdb next to it)")
    p.add_argument("--select", default=None, help="mdtraj atom selection, e.g. 'protein' to strip solvent "
                                                   "(default: all atoms)")
    p.add_argument("--stride", type=int, default=1, help="use every n-th frame")
    p.add_argument("--out", required=True, help="flow file (.pt)")
    add_system_arguments(p)
    p.add_argument("--no-validate", action="store_true", help="skip the proposal-energy validation")
    p.add_argument("--temperature", type=float, default=300.0, help="K of the training data (for validation)")
    p.add_argument("--coordinates", default="internal", choices=sorted(TRANSFORMS),
                   help="the flow's fixed transform: internal coordinates from the topology's bonds, or "
                        "mean-free Cartesians")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    add_training_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    import openmm_flowpert as fp

    from ._io import read_trajectory

    frames, top = [], None
    for path in args.data:
        x, t = read_trajectory(path, args.top, args.select, args.stride)
        if top is not None and t.n_atoms != top.n_atoms:
            raise ValueError(f"{path} has {t.n_atoms} atoms, the first trajectory {top.n_atoms}")
        frames.append(x)
        top = t
    x = np.concatenate(frames, 0)
    print(f"{len(x)} frames of {top.n_atoms} atoms")
    energy = None
    if not args.no_validate and args.system:
        from ..energies import ReducedPotential
        from ..systems import get_system

        ms = get_system(args.system, args.forcefield)
        if ms.n_atoms != top.n_atoms:
            raise ValueError(f"--system {args.system} has {ms.n_atoms} atoms but the trajectory has {top.n_atoms}; "
                             "pass the matching system or --no-validate")
        energy = ReducedPotential(ms.system, args.temperature)
    ckpt = args.out + ".ckpt"
    if args.restart and os.path.exists(ckpt):
        os.unlink(ckpt)
    from ..training import TrainingConfig

    hyper = {name: getattr(args, name) for name in TrainingConfig.help()}
    flow = fp.train_flow(x, topology=top.to_openmm(), coordinates=args.coordinates, temperature=args.temperature,
                         energy=energy, checkpoint=ckpt, progress=True, **hyper)
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
