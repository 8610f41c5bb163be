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


def test_seed_replica_exchange_makes_numba_swaps_reproducible():
    """openmmtools' swap-all mixer runs in numba with its own generator: seed_replica_exchange must
    reach it (np.random.seed alone does not), so seeded replica-exchange runs are reproducible."""
    import numpy as np
    from openmmtools import multistate

    from openmm_flowpert.moves import seed_replica_exchange

    n = 6
    u = np.random.default_rng(0).normal(size=(n, n))  # flat-ish energies: many swaps accepted

    def mix(seed):
        if seed is not None:
            seed_replica_exchange(seed, 3)
        else:
            np.random.seed(3)  # the numpy generator alone
        states = np.arange(n)
        acc, prop = np.zeros((n, n)), np.zeros((n, n))
        multistate.ReplicaExchangeSampler._mix_all_replicas_numba(200, n, states, u, acc, prop)  # in place
        return states

    a, b = mix(11), mix(11)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, mix(12))
    plain = [tuple(mix(None)) for _ in range(4)]
    assert len(set(plain)) > 1  # np.random.seed does not reach numba's generator (why the helper exists)


def test_run_replica_exchange_resumes_and_refuses_other_settings(ala, ala_flow, tmp_path):
    """The library's one replica exchange (openmmtools ParallelTemperingSampler): frames by state,
    resume from its storage, and a one-line refusal of a storage made with other settings."""
    from openmm_flowpert.samplers.replica_exchange import geometric_temperatures, run_replica_exchange

    x0 = np.asarray(ala.positions.value_in_unit(unit.nanometer))
    temps = geometric_temperatures(300.0, 400.0, 3)
    storage = str(tmp_path / "rex.nc")
    kw = dict(flow=ala_flow.path, md_steps=10, n_proposals=3, seed=4, progress=False, read_states=(0, 2))
    first = run_replica_exchange(ala.system, x0, temps, 2, storage, **kw)
    assert first.positions[0].shape == (2, 22, 3) and first.positions[2].shape == (2, 22, 3)
    assert first.reduced_energies.shape == (3, 2) and np.isfinite(first.reduced_energies).all()
    assert first.move_statistics["n_proposed"] == 2 * 3      # the target state's move: 3 per iteration
    resumed = run_replica_exchange(ala.system, x0, temps, 4, storage, **kw)
    assert resumed.positions[0].shape == (4, 22, 3)
    np.testing.assert_array_equal(resumed.positions[0][:2], first.positions[0])
    assert resumed.move_statistics["n_proposed"] == 4 * 3
    for change in ({"seed": 5}, {"md_steps": 11}, {"flow": None}, {"selection": "metropolis"}):
        with pytest.raises(ValueError, match="other settings"):
            run_replica_exchange(ala.system, x0, temps, 5, storage, **{**kw, **change})
    with pytest.raises(ValueError, match="other settings"):
        run_replica_exchange(ala.system, x0, temps[:2], 5, storage, **kw)


def test_run_replica_exchange_with_weighted_selection(ala, ala_flow, tmp_path):
    """selection="weights" reaches every replica's flow move, is stored with the run (so a resume
    keeps it, bit for bit) and a resume with the Metropolis rule is refused."""
    from openmm_flowpert.samplers.replica_exchange import _flow_move, run_replica_exchange

    x0 = np.asarray(ala.positions.value_in_unit(unit.nanometer))
    storage = str(tmp_path / "rex.nc")
    kw = dict(flow=ala_flow.path, md_steps=10, n_proposals=3, seed=4, progress=False, selection="weights")
    first = run_replica_exchange(ala.system, x0, [300.0, 330.0], 2, storage, **kw)
    reporter = multistate.MultiStateReporter(storage, open_mode="r")
    try:
        sampler = multistate.ParallelTemperingSampler.from_storage(reporter)
        assert _flow_move(sampler).selection == "weights"
    finally:
        reporter.close()
    assert first.move_statistics["n_proposed"] == 2 * 3
    resumed = run_replica_exchange(ala.system, x0, [300.0, 330.0], 3, storage, **kw)
    np.testing.assert_array_equal(resumed.positions[0][:2], first.positions[0])
    with pytest.raises(ValueError, match="other settings"):
        run_replica_exchange(ala.system, x0, [300.0, 330.0], 4, storage, **{**kw, "selection": "metropolis"})


def test_replica_exchange_redraws_velocities_after_swaps():
    """Each replica's Langevin segment starts from velocities drawn at its current state's temperature.
    Carried across a swap, velocities belong to the previous temperature and heat the cold end of the
    ladder: measured on alanine dipeptide (8 replicas, 300-600 K, 250 iterations of 500 fs), <u> at
    300 K was -15.5 +- 0.5 kT with carried velocities (four more runs: -16.0 to -16.4) against
    -17.6 +- 0.4 with redrawn ones and -18.06 +- 0.07 from plain MD (docs/benchmarks.md section 6)."""
    from openmm_flowpert.samplers.replica_exchange import _moves

    seq = _moves(None, md_steps=10, timestep_fs=1.0, friction=1.0, n_proposals=4, estimator="fp++",
                 prior_scale=None, seed=0, device=None)
    langevin = [m for m in seq.move_list if isinstance(m, mcmc.LangevinDynamicsMove)]
    assert len(langevin) == 1 and langevin[0].reassign_velocities is True
