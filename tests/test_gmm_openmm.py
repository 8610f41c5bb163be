"""Tests of the openmm-torch Gaussian-mixture system."""
import copy

import numpy as np
import pytest
import torch
import openmm
from openmm import unit

from openmm_flowpert.energies import (ReducedPotential, check_system, is_translation_invariant,
                                      translation_invariance_by_force_types)
from openmm_flowpert.testsystems.gmm_openmm import GaussianMixture


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture(n_particles=4, length_scale=0.5, seed=1)


def openmm_energies(system, x, platform="Reference", forces=False):
    ctx = openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName(platform))
    e, f = [], []
    for xi in x:
        ctx.setPositions(xi)
        s = ctx.getState(getEnergy=True, getForces=forces)
        e.append(s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        if forces:
            f.append(s.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return (np.array(e), np.array(f)) if forces else np.array(e)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_energy_and_forces_match_target(gmm, platform):
    rng = np.random.default_rng(0)
    x = np.concatenate([gmm.sample(6, seed=2), rng.normal(scale=0.7, size=(6, 4, 3))])
    e, f = openmm_energies(gmm.system, x, platform, forces=True)
    xt = torch.tensor(x.reshape(len(x), -1) / gmm.length_scale, requires_grad=True)
    u = gmm.target.energy(xt)
    u.sum().backward()
    # float64 throughout (openmm-torch passes float64 positions on Reference and CPU): ~1e-15 relative
    np.testing.assert_allclose(e, gmm.kT * u.detach().numpy(), rtol=1e-12)
    f_ref = -gmm.kT * xt.grad.numpy().reshape(x.shape) / gmm.length_scale
    np.testing.assert_allclose(f, f_ref, rtol=1e-10, atol=1e-9 * np.abs(f_ref).max())


def test_attributes(gmm):
    import mdtraj
    assert gmm.topology.getNumAtoms() == 4 == gmm.system.getNumParticles()
    assert mdtraj.Topology.from_openmm(gmm.topology).n_atoms == 4
    x0 = gmm.positions.value_in_unit(unit.nanometer)
    assert x0.shape == (4, 3) and np.isfinite(openmm_energies(gmm.system, [x0])).all()
    assert gmm.exact_fraction_left == pytest.approx(0.25, abs=0.01)  # well tails: 0.2516 here
    check_system(gmm.system, n_atoms=4)
    assert translation_invariance_by_force_types(gmm.system) is None
    assert not is_translation_invariant(gmm.system, gmm.positions)
    with pytest.raises(ValueError, match="pass positions"):
        check_system(gmm.system, translation_invariant_required=True)


def test_thermodynamic_state_deepcopy_and_xml_roundtrip(gmm):
    from openmmtools.states import ThermodynamicState
    state = ThermodynamicState(gmm.system, gmm.temperature)
    state2 = copy.deepcopy(state)
    system_xml = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(gmm.system))
    x = gmm.sample(5, seed=7)
    ref = openmm_energies(gmm.system, x)
    np.testing.assert_array_equal(openmm_energies(state2.system, x), ref)
    np.testing.assert_array_equal(openmm_energies(system_xml, x), ref)
    rp = ReducedPotential.from_thermodynamic_state(state2, platform="CPU", n_workers=2)
    np.testing.assert_allclose(rp(x), ref / gmm.kT, rtol=1e-12)


def test_short_md_is_stable(gmm):
    integrator = openmm.LangevinMiddleIntegrator(gmm.temperature, 1.0 / unit.picosecond,
                                                 2.0 * unit.femtosecond)
    ctx = openmm.Context(gmm.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(gmm.positions)
    integrator.step(200)
    assert np.isfinite(ctx.getState(getEnergy=True).getPotentialEnergy()._value)


def test_exact_sampling_mean_reduced_energy(gmm):
    """Exact samples: OpenMM's reduced energy equals the torch target's; mean energy and left-well
    fraction agree with their exact values to 5 SE.

    Measured z over sample seeds 11-15 (the test uses 11):
      mean reduced energy: -1.52 -0.36 -0.28 -0.46 -3.15 (40 seeds 11-50: SD 1.24, min -3.66, max +2.03)
      left-well fraction:  -0.75 -1.09 -0.80 +1.10 +2.03
    The energies are skewed (skewness 0.8): a low sample mean comes with a low sample SD, so the
    negative tail of z is longer than a normal one; hence 5 SE, not 3.
    """
    n = 3000
    x = gmm.sample(n, seed=11)
    assert x.shape == (n, 4, 3)
    u = ReducedPotential(gmm.system, gmm.temperature, n_workers=1)(x)
    np.testing.assert_allclose(u, gmm.reduced_energy(x), rtol=1e-12)
    mean, se = gmm.exact_mean_reduced_energy(n=100_000)
    assert abs(u.mean() - mean) < 5.0 * np.hypot(u.std() / np.sqrt(n), se)
    assert mean == pytest.approx(gmm.target.exact_mean_energy(n=100_000)[0])
    frac = gmm.left(x).mean()
    assert abs(frac - gmm.exact_fraction_left) < 5.0 * np.sqrt(0.25 * 0.75 / n)
