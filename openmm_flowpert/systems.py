"""Built-in molecular systems, selectable by name.

Every builder returns a :class:`MolecularSystem`: an ``openmm.System`` without constraints and
without periodic box (what flow moves need), its ``openmm.app.Topology`` and starting positions
(nm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np

__all__ = ["MolecularSystem", "alanine_dipeptide", "get_system", "SYSTEMS"]


@dataclass
class MolecularSystem:
    """An OpenMM system ready for flow moves.

    Attributes
    ----------
    name : str
    system : openmm.System
        No constraints, no periodic box.
    topology : openmm.app.Topology
    positions : numpy.ndarray, (N, 3) in nm
    """

    name: str
    system: object
    topology: object
    positions: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])


def _positions_nm(positions) -> np.ndarray:
    from openmm import unit

    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.nanometer)
    return np.asarray(positions, dtype=np.float64)


def alanine_dipeptide(solvent: str = "vacuum") -> MolecularSystem:
    """Alanine dipeptide (ACE-ALA-NME, 22 atoms), amber96, no constraints.

    Parameters
    ----------
    solvent : {"vacuum", "implicit"}
        Vacuum, or OBC implicit solvent (openmmtools' test systems).
    """
    from openmmtools import testsystems

    if solvent == "vacuum":
        ts = testsystems.AlanineDipeptideVacuum(constraints=None)
    elif solvent == "implicit":
        ts = testsystems.AlanineDipeptideImplicit(constraints=None)
    else:
        raise ValueError(f"solvent must be 'vacuum' or 'implicit', got {solvent!r}")
    return MolecularSystem(f"alanine-dipeptide-{solvent}", ts.system, ts.topology, _positions_nm(ts.positions))


SYSTEMS: Dict[str, Callable[[], MolecularSystem]] = {
    "alanine-dipeptide": lambda: alanine_dipeptide("vacuum"),
    "alanine-dipeptide-vacuum": lambda: alanine_dipeptide("vacuum"),
    "alanine-dipeptide-implicit": lambda: alanine_dipeptide("implicit"),
}


def get_system(name: str) -> MolecularSystem:
    """A built-in system by name (see :data:`SYSTEMS`)."""
    try:
        return SYSTEMS[name]()
    except KeyError:
        raise ValueError(f"unknown system {name!r}; built-in systems: {', '.join(sorted(SYSTEMS))}") from None
