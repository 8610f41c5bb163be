"""Validation of OpenMM Systems for flow moves, and a translation-invariance test.

Flow moves propose new Cartesian positions for every particle at once, so every particle must be a
real, massive atom, there may be no constraints, and the system must be non-periodic.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import openmm
from openmm import unit

__all__ = ["check_system", "is_translation_invariant", "is_rotation_invariant",
           "translation_invariance_by_force_types"]

# Forces whose energy depends only on interparticle geometry (distances, angles, dihedrals) when the
# system is non-periodic. Forces without energy (CMMotionRemover, thermostats) count as invariant.
_INVARIANT_FORCES = frozenset({
    "HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "RBTorsionForce",
    "CMAPTorsionForce", "NonbondedForce", "CustomNonbondedForce", "CustomBondForce",
    "CustomAngleForce", "CustomTorsionForce", "GBSAOBCForce", "CustomGBForce", "CustomHbondForce",
    "CustomManyParticleForce", "RMSDForce", "CMMotionRemover", "AndersenThermostat",
})
# Forces that may depend on absolute positions: decided numerically only.
# (CustomCompoundBondForce and CustomCentroidBondForce expressions may use x1, y1, z1 ...;
#  TorchForce is arbitrary code.)
_EXTERNAL_FORCES = frozenset({"CustomExternalForce"})


def check_system(system: openmm.System, n_atoms: Optional[int] = None,
                 translation_invariant_required: bool = False,
                 positions=None, rotation_invariant_required: bool = False) -> None:
    """Raise ``ValueError`` if ``system`` cannot be sampled with flow moves.

    Parameters
    ----------
    system : openmm.System
        The system to check.
    n_atoms : int, optional
        Number of atoms the flow was built for; must equal ``system.getNumParticles()``.
    translation_invariant_required : bool
        Require that the potential energy be unchanged by rigid translations (needed by mean-free,
        translation-equivariant flows). Decided by :func:`is_translation_invariant`: numerically if
        ``positions`` is given, otherwise from the force types.
    positions : array_like, optional
        A configuration (N, 3) in nm for the numerical translation test.
    rotation_invariant_required : bool
        Require that the energy be unchanged by rigid rotations (internal-coordinate flows draw
        the orientation from the Haar measure); needs ``positions`` (numerical test).

    Raises
    ------
    ValueError
        On constraints, periodic boundary conditions, virtual sites, massless particles, an
        atom-count mismatch, or (when required) a potential that is not translation invariant.
        The message names the problem and the fix.
    """
    n = system.getNumParticles()
    if n_atoms is not None and int(n_atoms) != n:
        raise ValueError(f"atom-count mismatch: the system has {n} particles but {int(n_atoms)} were "
                         "expected (the flow, positions or topology belong to a different system)")
    n_con = system.getNumConstraints()
    if n_con > 0:
        raise ValueError(f"the system has {n_con} constraints; flow moves need an unconstrained system. "
                         "Build it with constraints=None (e.g. forcefield.createSystem(..., "
                         "constraints=None, rigidWater=False), openmmtools testsystems with "
                         "constraints=None) or remove the constraints (system.removeConstraint)")
    if system.usesPeriodicBoundaryConditions():
        raise ValueError("the system uses periodic boundary conditions, which flow moves do not support; "
                         "build a non-periodic system (nonbondedMethod=NoCutoff or CutoffNonPeriodic, "
                         "implicit solvent or vacuum)")
    vsites = [i for i in range(n) if system.isVirtualSite(i)]
    if vsites:
        raise ValueError(f"the system has {len(vsites)} virtual sites (first: particle {vsites[0]}), which "
                         "are not supported: flow moves need every particle to be a real massive atom; "
                         "use a force field without virtual sites / extra points")
    massless = [i for i in range(n) if system.getParticleMass(i).value_in_unit(unit.dalton) == 0.0]
    if massless:
        raise ValueError(f"the system has {len(massless)} massless particles (first: particle "
                         f"{massless[0]}), which are not supported: flow moves need every particle to be "
                         "a real massive atom; give them a mass or remove them")
    if translation_invariant_required:
        if positions is not None:
            inv = is_translation_invariant(system, positions)
        else:
            inv = translation_invariance_by_force_types(system)
            if inv is None:
                raise ValueError("cannot decide from the force types "
                                 f"({_force_names(system)}) whether the energy is translation "
                                 "invariant; pass positions= for a numerical test")
        if not inv:
            raise ValueError("the potential energy is not translation invariant (e.g. a "
                             "CustomExternalForce or restraint to absolute positions), so a mean-free "
                             "(translation-equivariant) flow cannot sample it; use a flow that is not "
                             "mean-free, or remove the position-dependent external forces")
    if rotation_invariant_required:
        if positions is None:
            raise ValueError("rotation invariance can only be tested numerically: pass positions")
        if not is_rotation_invariant(system, positions):
            raise ValueError("the potential energy is not rotation invariant (an external field or a "
                             "restraint to absolute positions), so an internal-coordinate flow, which leaves "
                             "the orientation to the Haar measure, cannot sample it; use a Cartesian flow "
                             "(train_flow(..., coordinates='cartesian')) or remove the external forces")


def _force_names(system: openmm.System) -> str:
    return ", ".join(f.__class__.__name__ for f in system.getForces())


def _force_invariance(force: openmm.Force) -> Optional[bool]:
    name = force.__class__.__name__
    if name in _INVARIANT_FORCES:
        return True
    if name in _EXTERNAL_FORCES:
        return force.getNumParticles() == 0
    if name == "CustomCVForce":
        results = [_force_invariance(force.getCollectiveVariable(i))
                   for i in range(force.getNumCollectiveVariables())]
        if any(r is False for r in results):
            return False
        return True if all(r is True for r in results) else None
    return None


def translation_invariance_by_force_types(system: openmm.System) -> Optional[bool]:
    """Translation invariance judged from force types alone.

    Returns
    -------
    bool or None
        True if every force is of a type whose energy depends only on interparticle geometry
        (bonded terms, NonbondedForce, GB, Custom{Bond,Angle,Torsion,Nonbonded,GB,Hbond,
        ManyParticle}Force, RMSDForce) or carries no energy (CMMotionRemover); False if a
        CustomExternalForce acts on any particle (its energy depends on absolute x, y, z; an
        expression that happens not to use them is misjudged); None when a force of another type
        (TorchForce, CustomCompoundBondForce, ...) makes it undecidable without a numerical test.
    """
    results = [_force_invariance(f) for f in system.getForces()]
    if any(r is False for r in results):
        return False
    return True if all(r is True for r in results) else None


def _energy_unchanged(system: openmm.System, positions, moves, rtol: float, atol: float) -> bool:
    """Energy (Reference, kJ/mol) at one configuration against the energies after rigid ``moves``
    (functions of an (N, 3) array); True if every change is at most atol + rtol * max(|U|, 1)."""
    from .reduced_potential import as_positions_array, energy_system
    x = as_positions_array(positions, system.getNumParticles())
    if x.shape[0] != 1:
        raise ValueError(f"positions must be one configuration (N, 3), got {x.shape[0]}")
    x = x[0]
    ctx = openmm.Context(energy_system(system), openmm.VerletIntegrator(1.0),
                         openmm.Platform.getPlatformByName("Reference"))

    def energy(p):
        ctx.setPositions(p)
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    u0 = energy(x)
    if not np.isfinite(u0):
        raise ValueError(f"energy at the given positions is not finite ({u0}); pass a valid configuration")
    tol = atol + rtol * max(abs(u0), 1.0)
    return all(abs(energy(move(x)) - u0) <= tol for move in moves)


def is_rotation_invariant(system: openmm.System, positions, *, n_trials: int = 3, rtol: float = 1e-6,
                          atol: float = 1e-6, seed: Optional[int] = 0) -> bool:
    """Whether the energy at one configuration (N, 3) nm is unchanged by ``n_trials`` random rigid
    rotations about its centroid (numerical test on the Reference platform, tolerances as in
    :func:`is_translation_invariant`)."""
    rng = np.random.default_rng(seed)
    rots = [np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(int(n_trials))]
    rots = [r * np.sign(np.linalg.det(r)) for r in rots]

    def rotate(r):
        return lambda x: (x - x.mean(0)) @ r.T + x.mean(0)

    return _energy_unchanged(system, positions, [rotate(r) for r in rots], rtol, atol)


def is_translation_invariant(system: openmm.System, positions=None, *, n_trials: int = 3,
                             displacement: float = 1.0, rtol: float = 1e-6, atol: float = 1e-6,
                             seed: Optional[int] = 0) -> bool:
    """Whether the potential energy is unchanged under rigid translations.

    With ``positions``, the test is numerical and authoritative: the energy (Reference platform,
    double precision) at ``positions`` is compared with the energies after ``n_trials`` random rigid
    translations of length ``displacement`` nm; the system counts as invariant if every difference is
    at most ``atol + rtol * max(|U|, 1 kJ/mol)``. This covers any force type (TorchForce included).
    Without ``positions`` the force types decide (:func:`translation_invariance_by_force_types`).

    Parameters
    ----------
    system : openmm.System
        The system (non-periodic; periodic systems are invariant by construction but unsupported).
    positions : array_like, optional
        One configuration (N, 3) in nm (numpy, torch, or openmm Quantity).
    n_trials : int
        Number of random translations.
    displacement : float
        Length of each translation in nm.
    rtol, atol : float
        Relative and absolute (kJ/mol) tolerance on the energy change.
    seed : int, optional
        Seed of the random directions.

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        If ``positions`` is None and the force types do not decide, or if the energy at
        ``positions`` is not finite.
    """
    if positions is None:
        inv = translation_invariance_by_force_types(system)
        if inv is None:
            raise ValueError(f"cannot decide from the force types ({_force_names(system)}) whether the "
                             "energy is translation invariant; pass positions for a numerical test")
        return inv
    rng = np.random.default_rng(seed)
    shifts = []
    for _ in range(int(n_trials)):
        t = rng.normal(size=3)
        shifts.append(t * displacement / np.linalg.norm(t))
    return _energy_unchanged(system, positions, [lambda x, t=t: x + t for t in shifts], rtol, atol)
