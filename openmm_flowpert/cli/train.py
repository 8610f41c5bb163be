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


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a flow on a trajectory", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", help="trajectory file(s), any format mdtraj reads")
    p.add_argument("--top", default=None, help="topology for the trajectory (default: the .pdb next to it)")
    p.add_argument("--select", default=None, help="mdtraj atom selection, e.g. 'protein' to strip solvent")
    p.add_argument("--stride", type=int, default=1, help="use every n-th frame")
    p.add_argument("--out", required=True, help="flow file (.pt)")
    add_system_arguments(p)
    p.add_argument("--no-validate", action="store_true", help="skip the proposal-energy validation")
    p.add_argument("--temperature", type=float, default=300.0, help="K of the training data (for validation)")
    p.add_argument("--coordinates", default="internal", choices=["internal", "cartesian"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="integrator steps (RK4, quadratic grid)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--seed", type=int, default=0)
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
    flow = fp.train_flow(x, topology=top.to_openmm() if args.coordinates == "internal" else None,
                         coordinates=args.coordinates, hidden=args.hidden, n_layers=args.layers, n_steps=args.steps,
                         epochs=args.epochs, batch_size=args.batch, lr=args.lr, ema=args.ema, patience=args.epochs,
                         max_minutes=args.minutes, temperature=args.temperature, energy=energy, checkpoint=ckpt,
                         seed=args.seed, progress=True)
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
