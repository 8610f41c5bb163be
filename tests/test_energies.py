"""Tests of the energy layer: ReducedPotential, check_system, translation invariance."""
import pickle

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm: openmm-torch plugin load)
import openmm
from openmm import unit
from openmmtools import testsystems

from openmm_flowpert.energies import (ReducedPotential, check_system, default_n_workers, energy_system,
                                      is_translation_invariant, kT_kJ_per_mol, platform_candidates,
                                      translation_invariance_by_force_types)

T = 300.0 * unit.kelvin


@pytest.fixture(scope="module")
def ala():
    return testsystems.AlanineDipeptideVacuum(constraints=None)


@pytest.fixture(scope="module")
def configs(ala):
    x0 = np.asarray(ala.positions.value_in_unit(unit.nanometer))
    rng = np.random.default_rng(0)
    return x0 + 0.01 * rng.normal(size=(13, *x0.shape))


def direct_reduced(system, x, platform):
    ctx = openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName(platform))
    out = []
    for xi in x:
        ctx.setPositions(xi)
        out.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.array(out) / kT_kJ_per_mol(T)


@pytest.mark.parametrize("platform,rtol", [("Reference", 1e-12), ("CPU", 1e-5)])
def test_matches_direct_single_context(ala, configs, platform, rtol):
    ref = direct_reduced(ala.system, configs, platform)
    with ReducedPotential(ala.system, T, platform=platform, n_workers=1) as rp:
        u = rp(configs)
    assert u.dtype == np.float64 and u.shape == (len(configs),)
    np.testing.assert_allclose(u, ref, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("platform,rtol", [("Reference", 0.0), ("CPU", 1e-5)])
def test_workers_equal_serial(ala, configs, platform, rtol):
    serial = ReducedPotential(ala.system, T, platform=platform, n_workers=1)(configs)
    rp = ReducedPotential(ala.system, T, platform=platform, n_workers=3)
    batched = rp(configs)
    np.testing.assert_allclose(batched, serial, rtol=rtol, atol=1e-6 if rtol else 0.0)
    assert rp.n_workers == 3 and sum(c is not None for c in rp._contexts) == 3
    np.testing.assert_array_equal(rp(configs[:2]), batched[:2])  # fewer configs than workers
    rp.close()
    np.testing.assert_allclose(rp(configs), batched, rtol=rtol)  # contexts rebuilt after close()
    rp.close()


def test_input_shapes(ala, configs):
    rp = ReducedPotential(ala.system, T, platform="Reference", n_workers=1)
    u = rp(configs)
    n = ala.system.getNumParticles()
    np.testing.assert_array_equal(rp(configs.reshape(len(configs), 3 * n)), u)
    np.testing.assert_array_equal(rp(torch.from_numpy(configs)), u)
    np.testing.assert_array_equal(rp(configs[0]), u[:1])
    np.testing.assert_allclose(rp(unit.Quantity(configs * 10.0, unit.angstrom)), u, rtol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        rp(configs[:, :-1])


@pytest.mark.parametrize("n_workers", [1, 3])
def test_reduced_gradients_match_finite_differences(ala, configs, n_workers):
    """du/dx (kT/nm) from OpenMM's forces equals central differences of u along random directions
    (relative 1e-6), u equals __call__'s, and a NaN configuration gives u = inf with a zero gradient.
    A gradient of the wrong sign (the forces themselves) or in kJ/mol/nm fails the comparison."""
    rp = ReducedPotential(ala.system, T, platform="Reference", n_workers=n_workers)
    x = configs[:5].copy()
    u, g = rp.reduced_energies_and_gradients(x)
    np.testing.assert_array_equal(u, rp(x))
    assert g.shape == x.shape
    d = np.random.default_rng(1).normal(size=x.shape)
    h = 1e-6
    fd = (rp(x + h * d) - rp(x - h * d)) / (2 * h)
    np.testing.assert_allclose((g * d).sum(axis=(1, 2)), fd, rtol=1e-6, atol=1e-6)
    assert np.abs(fd + (g * d).sum(axis=(1, 2))).min() > 1.0                      # not the force
    assert np.abs(fd - rp.kT * (g * d).sum(axis=(1, 2))).min() > 1.0              # not kJ/mol/nm
    x[2, 4, 1] = np.nan
    u, g = rp.reduced_energies_and_gradients(x)
    assert np.isposinf(u[2]) and not g[2].any() and np.isfinite(u[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_nan_positions_give_inf(ala, configs, platform):
    x = configs[:4].copy()
    x[1, 3, 0] = np.nan
    x[2, 0, 2] = np.inf
    rp = ReducedPotential(ala.system, T, platform=platform, n_workers=2)
    u = rp(x)
    assert np.isposinf(u[1]) and np.isposinf(u[2])
    np.testing.assert_allclose(u[[0, 3]], rp(configs[[0, 3]]), rtol=1e-6)


def test_pickle_and_thermodynamic_state(ala, configs):
    from openmmtools.states import ThermodynamicState
    state = ThermodynamicState(ala.system, T)
    rp = ReducedPotential.from_thermodynamic_state(state, platform="Reference", n_workers=1)
    u = rp(configs[:3])
    ctx = state.create_context(openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName("Reference"))
    for xi, ui in zip(configs[:3], u):
        ctx.setPositions(xi)
        assert ui == pytest.approx(state.reduced_potential(ctx), rel=1e-12)
    rp2 = pickle.loads(pickle.dumps(rp))
    np.testing.assert_array_equal(rp2(configs[:3]), u)


def _langevin_positions(ala, between) -> np.ndarray:
    """Positions (nm) after 2 x 20 seeded Reference Langevin steps with ``between()`` run in between."""
    integrator = openmm.LangevinMiddleIntegrator(T, 1.0 / unit.picosecond, 0.001 * unit.picosecond)
    integrator.setRandomNumberSeed(11)
    ctx = openmm.Context(ala.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(ala.positions)
    ctx.setVelocitiesToTemperature(T, 5)
    integrator.step(20)
    between()
    integrator.step(20)
    return ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def test_energy_contexts_leave_the_langevin_noise_alone(ala, configs):
    """openmmtools' NVT ``ThermodynamicState.system`` carries an AndersenThermostat (seed 0); a
    Reference context holding it reseeds OpenMM's process-wide generator from the clock, which
    made hybrid and replica-exchange runs with flow moves unrepeatable. Energy contexts drop it;
    the control (a context that keeps it) does change the trajectory."""
    from openmmtools.states import ThermodynamicState
    system = ThermodynamicState(ala.system, T).system
    assert any(isinstance(f, openmm.AndersenThermostat) for f in system.getForces())
    reference = _langevin_positions(ala, lambda: None)

    def energies():
        ReducedPotential(system, T, platform="Reference", n_workers=1)(configs[:2])
        check_system(system, translation_invariant_required=True, rotation_invariant_required=True,
                     positions=configs[0])

    np.testing.assert_array_equal(_langevin_positions(ala, energies), reference)
    assert not any(isinstance(f, openmm.AndersenThermostat) for f in energy_system(system).getForces())

    def thermostat_context():  # negative control
        openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName("Reference"))

    assert not np.array_equal(_langevin_positions(ala, thermostat_context), reference)


def test_automatic_platform(ala, configs):
    cand = platform_candidates(22)
    assert cand.index("Reference") < cand.index("CPU")
    big = platform_candidates(500)
    assert big.index("CPU") < big.index("Reference")
    rp = ReducedPotential(ala.system, T)
    u = rp(configs[:2])
    assert rp.platform_name == cand[0]
    assert rp.n_workers == default_n_workers(rp.platform_name, 22)
    assert default_n_workers("Reference", 22) == 1 and default_n_workers("CUDA", 5000) == 1
    np.testing.assert_allclose(u, direct_reduced(ala.system, configs[:2], "Reference"), rtol=1e-5)


# ------------------------------------------------------------------ check_system
def test_check_system_accepts_unconstrained_vacuum(ala):
    check_system(ala.system, n_atoms=22, translation_invariant_required=True)
    check_system(ala.system, translation_invariant_required=True, positions=ala.positions)


def test_check_system_constraints():
    system = testsystems.AlanineDipeptideVacuum().system
    n = system.getNumConstraints()
    assert n > 0
    with pytest.raises(ValueError, match=rf"{n} constraints.*constraints=None"):
        check_system(system)


def test_check_system_periodic():
    with pytest.raises(ValueError, match="periodic"):
        check_system(testsystems.LennardJonesFluid(nparticles=27).system)


def test_check_system_virtual_site_and_massless(ala):
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(ala.system))
    i = system.addParticle(0.0)
    system.setVirtualSite(i, openmm.TwoParticleAverageSite(0, 1, 0.5, 0.5))
    with pytest.raises(ValueError, match="virtual site"):
        check_system(system)
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(ala.system))
    system.setParticleMass(5, 0.0)
    with pytest.raises(ValueError, match="massless"):
        check_system(system)


def test_check_system_atom_count(ala):
    with pytest.raises(ValueError, match="atom-count mismatch.*22.*23"):
        check_system(ala.system, n_atoms=23)


def test_translation_invariance(ala):
    assert translation_invariance_by_force_types(ala.system) is True
    assert is_translation_invariant(ala.system)
    assert is_translation_invariant(ala.system, ala.positions)
    ext = testsystems.CustomExternalForcesTestSystem()
    assert translation_invariance_by_force_types(ext.system) is False
    assert not is_translation_invariant(ext.system, ext.positions)
    with pytest.raises(ValueError, match="not translation invariant"):
        check_system(ext.system, translation_invariant_required=True)
