"""Built-in molecular systems, selectable by name.

Every builder returns a :class:`MolecularSystem`: an ``openmm.System`` without constraints and
without periodic box (what flow moves need), its ``openmm.app.Topology`` and starting positions
(nm).
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np

__all__ = ["MolecularSystem", "alanine_dipeptide", "alanine_tetrapeptide", "cln025", "from_pdb", "from_amber", "gmm",
           "get_system", "SYSTEMS", "bundled_flow"]


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


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, torsion: float) -> np.ndarray:
    """Position of an atom d bonded to c with |cd| = ``bond`` (any length unit), angle b-c-d =
    ``angle`` and dihedral a-b-c-d = ``torsion`` (degrees, IUPAC sign)."""
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    th, ph = np.radians(angle), np.radians(torsion)
    local = bond * np.array([-np.cos(th), np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph)])
    return c + local[0] * bc + local[1] * np.cross(n, bc) + local[2] * n


def _ace_ala_nme_heavy(n_ala: int, phi: float, psi: float) -> list:
    """Heavy atoms of ACE-(ALA)n-NME as (residue index, residue name, atom name, position in Angstrom):
    an ideal trans backbone (Engh-Huber bond lengths and angles) with every residue at backbone
    torsions phi, psi (degrees), L configuration."""
    c, prev = np.array([1.52, 0.0, 0.0]), "ACE"
    rows = [(0, "ACE", "CH3", np.zeros(3)), (0, "ACE", "C", c)]
    a, b, tors = np.array([2.0, 1.4, 0.0]), np.zeros(3), 180.0  # a: a dummy atom fixing the first plane
    for r in range(1, n_ala + 2):
        name = "ALA" if r <= n_ala else "NME"
        n = _place(a, b, c, 1.329, 116.2, tors)                     # psi of the previous residue
        ca = _place(b, c, n, 1.458, 121.7, 180.0)                   # omega: trans peptide bond
        rows.append((r - 1, prev, "O", _place(ca, n, c, 1.231, 122.7, 0.0)))  # cis to the next CA
        rows.append((r, name, "N", n))
        if name == "NME":
            rows.append((r, name, "C", ca))
            break
        c_next = _place(c, n, ca, 1.525, 111.2, phi)
        rows += [(r, name, "CA", ca), (r, name, "C", c_next),
                 (r, name, "CB", _place(c_next, n, ca, 1.530, 110.5, -122.5))]
        a, b, c, prev, tors = n, ca, c_next, name, psi
    return sorted(rows, key=lambda row: row[0])


def alanine_tetrapeptide(solvent: str = "vacuum") -> MolecularSystem:
    """Alanine tetrapeptide (ACE-ALA-ALA-ALA-NME, 42 atoms), amber14 (ff14SB), vacuum, no constraints.

    Built from ideal backbone geometry (all residues at phi = -80, psi = 150 degrees, trans peptide
    bonds), hydrogens added by OpenMM's ``Modeller`` and minimized on the Reference platform, so the
    structure is the same in every process. No cutoff, no constraints, no centre-of-mass motion
    remover. Positions in nm; d = 3 * 42 = 126 Cartesian coordinates, 120 internal ones.

    Parameters
    ----------
    solvent : {"vacuum"}
        Vacuum only (the system of the internal-coordinate flow benchmarks).
    """
    import io
    import random

    import openmm
    from openmm import app, unit

    if solvent != "vacuum":
        raise ValueError(f"alanine tetrapeptide is built in vacuum only, got solvent={solvent!r}")
    lines = [f"ATOM  {k:5d} {atom:<4s} {res:3s} A{ri + 1:4d}    {xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}"
             f"  1.00  0.00           {atom[0]}" for k, (ri, res, atom, xyz) in
             enumerate(_ace_ala_nme_heavy(3, -80.0, 150.0), 1)]
    pdb = app.PDBFile(io.StringIO("\n".join(lines + ["END", ""])))
    ff = app.ForceField("amber14-all.xml")
    modeller = app.Modeller(pdb.topology, pdb.positions)
    reference = openmm.Platform.getPlatformByName("Reference")  # deterministic (the CPU platform's threads are not)
    state = random.getstate()
    try:  # Modeller starts added hydrogens from Python's global `random`: seed it, restore the caller's
        random.seed(0)
        modeller.addHydrogens(ff, platform=reference)
    finally:
        random.setstate(state)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                             removeCMMotion=False)
    context = openmm.Context(system, openmm.VerletIntegrator(1e-3), reference)
    context.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1e-3, 2000)
    x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return _checked(MolecularSystem("alanine-tetrapeptide-vacuum", system, modeller.topology, np.asarray(x)))


def _checked(ms: MolecularSystem) -> MolecularSystem:
    from .energies import check_system

    check_system(ms.system, n_atoms=ms.n_atoms)
    return ms


def cln025(solvent: str = "implicit", gb: str = "native") -> MolecularSystem:
    """CLN025 (YYDPETGTWY) from the 5awl crystal structure shipped with the package.

    Hydrogens added by pdbfixer at pH 7 (166 atoms); amber14 with OBC2 implicit solvent
    (``"implicit"``) or vacuum; no cutoff, no constraints, no centre-of-mass motion remover (it
    would make the MD non-Hamiltonian for nothing: the flows remove the centre of mass anyway).

    Parameters
    ----------
    solvent : {"implicit", "vacuum"}
    gb : {"native", "custom"}
        ``"native"`` (default): OpenMM's built-in ``GBSAOBCForce`` with the OBC2 radii and screening
        factors of ``implicit/obc2.xml`` and the same ACE surface term -- the same energy function as
        ``implicit/obc2.xml``'s ``CustomGBForce`` (``tests/test_chignolin.py``) and several times
        faster (docs/benchmarks.md section 9).
        ``"custom"``: the ``implicit/obc2.xml`` route.
    """
    import os
    import random

    import openmm
    from openmm import app
    from pdbfixer import PDBFixer

    if solvent not in ("implicit", "vacuum"):
        raise ValueError(f"solvent must be 'implicit' or 'vacuum', got {solvent!r}")
    if gb not in ("native", "custom"):
        raise ValueError(f"gb must be 'native' or 'custom', got {gb!r}")
    fixer = PDBFixer(filename=os.path.join(os.path.dirname(__file__), "data", "5awl.pdb"))
    fixer.platform = openmm.Platform.getPlatformByName("Reference")  # deterministic minimizations
    fixer.findMissingResidues()
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    # pdbfixer minimizes added heavy atoms with a Langevin integrator, and openmm's Modeller starts
    # added hydrogens from positions drawn from Python's global `random`: seed both (and restore the
    # caller's random state) so the built structure is the same in every process.
    state = random.getstate()
    try:
        random.seed(0)
        fixer.addMissingAtoms(seed=0)
        fixer.addMissingHydrogens(7.0)
    finally:
        random.setstate(state)
    custom = solvent == "implicit" and gb == "custom"
    ff = app.ForceField(*(["amber14-all.xml"] + (["implicit/obc2.xml"] if custom else [])))
    system = ff.createSystem(fixer.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False,
                             removeCMMotion=False)
    if solvent == "implicit" and gb == "native":
        from openmm.app.internal.customgbforces import GBSAOBC2Force

        nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
        obc = openmm.GBSAOBCForce()
        obc.setNonbondedMethod(openmm.GBSAOBCForce.NoCutoff)
        obc.setSoluteDielectric(1.0)
        obc.setSolventDielectric(78.5)
        for i, (radius, scale) in enumerate(GBSAOBC2Force.getStandardParameters(fixer.topology)):
            obc.addParticle(nb.getParticleParameters(i)[0], radius, scale)
        system.addForce(obc)
    return _checked(MolecularSystem(f"cln025-{solvent}", system, fixer.topology, _positions_nm(fixer.positions)))


def from_pdb(path: str, forcefield: Sequence[str] = ("amber14-all.xml", "implicit/obc2.xml")) -> MolecularSystem:
    """A system from a PDB file and OpenMM force-field files (no cutoff, no constraints).

    The PDB must be complete (hydrogens included; use pdbfixer otherwise) and must not describe a
    periodic box with explicit solvent: flow moves need non-periodic systems.
    """
    from openmm import app

    pdb = app.PDBFile(path)
    if pdb.topology.getPeriodicBoxVectors() is not None and any(
            r.name in ("HOH", "WAT") for r in pdb.topology.residues()):
        raise ValueError(f"{path} has a periodic box with explicit water; flow moves need a non-periodic "
                         "system: strip the solvent and use implicit solvent (e.g. implicit/obc2.xml)")
    ff = app.ForceField(*forcefield)
    try:
        system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    except ValueError as exc:
        raise ValueError(f"cannot parametrize {path} with {list(forcefield)}: {exc}. Is the structure complete "
                         "(hydrogens, terminal caps)? pdbfixer can add missing atoms") from None
    return _checked(MolecularSystem(os.path.splitext(os.path.basename(path))[0], system, pdb.topology,
                                    _positions_nm(pdb.positions)))


def from_amber(prmtop: str, inpcrd: str, implicit: Optional[str] = None) -> MolecularSystem:
    """A system from an AMBER prmtop/inpcrd pair (no cutoff, no constraints).

    ``implicit``: None (vacuum) or an OpenMM implicit-solvent model name such as ``"OBC2"``.
    """
    from openmm import app

    top = app.AmberPrmtopFile(prmtop)
    crd = app.AmberInpcrdFile(inpcrd)
    if top.topology.getPeriodicBoxVectors() is not None:
        raise ValueError(f"{prmtop} describes a periodic box; flow moves need a non-periodic system "
                         "(strip the solvent and rebuild the topology without a box)")
    kw = {"implicitSolvent": getattr(app, implicit)} if implicit else {}
    system = top.createSystem(nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False, **kw)
    return _checked(MolecularSystem(os.path.splitext(os.path.basename(prmtop))[0], system, top.topology,
                                    _positions_nm(crd.positions)))


def gmm(n_particles: int = 4) -> MolecularSystem:
    """The two-well Gaussian mixture as an OpenMM System (openmm-torch; d = 3 * n_particles)."""
    from openmm import app

    from .testsystems import GaussianMixture

    g = GaussianMixture(n_particles=n_particles)
    top = app.Topology()
    res = top.addResidue("GMM", top.addChain())
    for i in range(n_particles):
        top.addAtom(f"P{i}", app.element.argon, res)
    x0 = g.target.sample(1, seed=0).reshape(n_particles, 3).numpy() * g.length_scale
    return MolecularSystem(f"gmm-{3 * n_particles}d", g.system, top, np.asarray(x0, dtype=np.float64))


SYSTEMS: Dict[str, Callable[[], MolecularSystem]] = {
    "alanine-dipeptide": lambda: alanine_dipeptide("vacuum"),
    "alanine-dipeptide-vacuum": lambda: alanine_dipeptide("vacuum"),
    "alanine-dipeptide-implicit": lambda: alanine_dipeptide("implicit"),
    "alanine-tetrapeptide": lambda: alanine_tetrapeptide("vacuum"),
    "cln025": lambda: cln025("implicit"),
    "cln025-vacuum": lambda: cln025("vacuum"),
    "gmm-12d": lambda: gmm(4),
}


#: Flows shipped in ``openmm_flowpert/data`` for built-in systems (vacuum, no constraints, 300 K).
BUNDLED_FLOWS = {"alanine-dipeptide": "alanine-dipeptide-vacuum-300K.pt",
                 "alanine-dipeptide-vacuum": "alanine-dipeptide-vacuum-300K.pt"}


def bundled_flow(name: str) -> Optional[str]:
    """Path of the flow shipped for built-in system ``name`` (None if there is none)."""
    fname = BUNDLED_FLOWS.get(name)
    if fname is None:
        return None
    path = os.path.join(os.path.dirname(__file__), "data", fname)
    return path if os.path.isfile(path) else None


def get_system(name: str, forcefield: Optional[Sequence[str]] = None) -> MolecularSystem:
    """A built-in system by name (see :data:`SYSTEMS`), a PDB file (parametrized with ``forcefield``
    files, default amber14 + OBC2), or ``"file.prmtop:file.inpcrd"``."""
    if name in SYSTEMS:
        return SYSTEMS[name]()
    if name.endswith(".pdb"):
        if not os.path.isfile(name):
            raise ValueError(f"PDB file {name!r} does not exist")
        return from_pdb(name, tuple(forcefield) if forcefield else ("amber14-all.xml", "implicit/obc2.xml"))
    if ".prmtop" in name:
        prmtop, _, inpcrd = name.partition(":")
        inpcrd = inpcrd or os.path.splitext(prmtop)[0] + ".inpcrd"
        for f in (prmtop, inpcrd):
            if not os.path.isfile(f):
                raise ValueError(f"AMBER file {f!r} does not exist; pass --system file.prmtop:file.inpcrd")
        return from_amber(prmtop, inpcrd)
    raise ValueError(f"unknown system {name!r}; use a built-in name ({', '.join(sorted(SYSTEMS))}), a .pdb "
                     "file or file.prmtop:file.inpcrd")
