"""Files of the command line: trajectories (DCD + PDB topology, readable by mdtraj), JSON, atomically."""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np

from .._files import atomic_write


def write_trajectory(path: str, positions: np.ndarray, topology, time_ps: Optional[np.ndarray] = None) -> str:
    """Write positions (n, N, 3) nm as ``path`` (.dcd, or .h5 if PyTables is installed) plus a PDB
    topology next to it (same name, .pdb). Returns the topology path."""
    import mdtraj as md

    top = topology if isinstance(topology, md.Topology) else md.Topology.from_openmm(topology)
    traj = md.Trajectory(np.asarray(positions, dtype=np.float32).reshape(-1, top.n_atoms, 3), top, time=time_ps)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".dcd", ".h5", ".xtc", ".nc"):
        raise ValueError(f"trajectory file {path!r}: use a .dcd, .xtc, .nc or .h5 name")
    atomic_write(path, lambda tmp: traj.save(tmp, force_overwrite=True), ext)
    pdb = os.path.splitext(path)[0] + ".pdb"
    atomic_write(pdb, lambda tmp: traj[0].save_pdb(tmp, force_overwrite=True), ".pdb")
    return pdb


def read_trajectory(path: str, topology: Optional[str] = None, select: Optional[str] = None,
                    stride: int = 1) -> Tuple[np.ndarray, object]:
    """Positions (n, N, 3) nm and the mdtraj Topology of any trajectory mdtraj reads.

    ``topology`` defaults to the .pdb file next to ``path``; ``select`` is an mdtraj selection
    (e.g. ``"protein"`` to strip solvent and ions).
    """
    import mdtraj as md

    if not os.path.isfile(path):
        raise ValueError(f"trajectory {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if path.lower().endswith(".gz"):
        ext = os.path.splitext(path[:-3])[1].lower() + ".gz"
    known = _mdtraj_formats()
    if known and ext not in known:
        raise ValueError(f"trajectory {path!r}: mdtraj does not read {ext or 'files without an extension'}; use "
                         "e.g. .dcd, .xtc, .trr, .nc, .h5 or .pdb (with --top for the topology)")
    kw = {}
    if ext not in (".h5", ".pdb"):
        topology = topology or os.path.splitext(path)[0] + ".pdb"
        if not os.path.isfile(topology):
            raise ValueError(f"trajectory {path!r} needs a topology: pass --top FILE (pdb, prmtop, psf...)")
        kw["top"] = topology
    try:
        traj = md.load(path, stride=stride, **kw)
    except Exception as exc:  # mdtraj raises OSError, IndexError, ValueError... on empty or damaged files
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"trajectory {path!r} cannot be read ({msg}); is it a complete {ext} file"
                         + (f" of the atoms in {kw['top']!r}" if "top" in kw else "") + "?") from None
    if traj.n_frames == 0:
        raise ValueError(f"trajectory {path!r} has no frames")
    if select:
        try:
            idx = traj.topology.select(select)
        except Exception as exc:
            raise ValueError(f"bad selection {select!r} ({' '.join(str(exc).split())[:200]}); use mdtraj's "
                             "selection language, e.g. 'protein'") from None
        if len(idx) == 0:
            raise ValueError(f"selection {select!r} matches no atoms")
        traj = traj.atom_slice(idx)
    return np.asarray(traj.xyz, dtype=np.float64), traj.topology


def _mdtraj_formats():
    """File extensions mdtraj loads (empty if its registry cannot be read: then mdtraj decides)."""
    try:
        from mdtraj.formats.registry import FormatRegistry

        return set(FormatRegistry.loaders)
    except Exception:  # pragma: no cover - another mdtraj layout
        return set()


def write_json(path: str, data: dict) -> None:
    def dump(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, default=float)

    atomic_write(path, dump, ".json")
