"""FlowPerturbationMove inside openmmtools' loops on alanine dipeptide (vacuum, constraints=None):
MCMCSampler with hybrid MD, ReplicaExchangeSampler with netCDF storage, resume and extend."""
import numpy as np
import pytest
from openmm import unit
from openmmtools import mcmc, multistate, states, testsystems

import openmm_flowpert as fp
from openmm_flowpert import FlowPerturbationMove


@pytest.fixture(scope="module")
def ala():
    return testsystems.AlanineDipeptideVacuum(constraints=None)


@pytest.fixture(scope="module")
def ala_flow(ala, tmp_path_factory):
    """A small mean-free flow on thermal-like perturbations of the structure (a plumbing flow)."""
    x = np.asarray(ala.positions.value_in_unit(unit.nanometer))
    samples = x + 0.004 * np.random.default_rng(0).standard_normal((400, 22, 3))
    flow = fp.train_flow(samples, epochs=3, hidden=32, n_layers=2, n_steps=6, progress=False,
                         temperature=300.0)
    flow.save(tmp_path_factory.mktemp("ala") / "ala.pt")
    return flow


def test_mcmc_sampler_hybrid_md(ala, ala_flow):
    ts = states.ThermodynamicState(ala.system, 300 * unit.kelvin)
    ss = states.SamplerState(ala.positions)
    flow_move = FlowPerturbationMove(ala_flow, n_proposals=8, seed=1)
    move = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(timestep=1 * unit.femtoseconds, n_steps=20), flow_move])
    sampler = mcmc.MCMCSampler(ts, ss, move)
    sampler.run(3)
    assert flow_move.n_proposed == 24
    x = sampler.sampler_state.positions.value_in_unit(unit.nanometer)
    assert np.isfinite(x).all() and sampler.sampler_state.velocities is not None


def test_replica_exchange_storage_resume(ala, ala_flow, tmp_path):
    temps = [300.0, 360.0]
    thermo = [states.ThermodynamicState(ala.system, t * unit.kelvin) for t in temps]
    sampler_states = [states.SamplerState(ala.positions) for _ in temps]
    move = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(timestep=1 * unit.femtoseconds, n_steps=10),
                              FlowPerturbationMove(ala_flow, n_proposals=4, prior_scale="sqrt(T/T0)", seed=2)])
    storage = str(tmp_path / "rex.nc")
    sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=2)
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    sampler.create(thermodynamic_states=thermo, sampler_states=sampler_states, storage=reporter)
    sampler.run()
    proposed = [m.move_list[1].n_proposed for m in sampler.mcmc_moves]
    assert sum(proposed) > 0
    del sampler
    reporter.close()

    resumed = multistate.ReplicaExchangeSampler.from_storage(multistate.MultiStateReporter(storage))
    assert resumed.iteration == 2
    stats = [m.move_list[1].statistics["n_proposed"] for m in resumed.mcmc_moves]
    assert sum(stats) == sum(proposed)  # statistics persist across resume
    resumed.extend(1)
    assert resumed.iteration == 3
    assert sum(m.move_list[1].n_proposed for m in resumed.mcmc_moves) > sum(proposed)
