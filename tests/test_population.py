"""Population samplers on the 10-D two-well GMM: SMC on the weight exponent and latent MC.

References are exact: the fraction with x0 < 0 is 1/4 and log Z = 0 (the GMM is normalized).
Standard errors come from the spread of independent runs (SMC) or of chain means (latent MC).
Hutchinson(1) log-determinants are the negative control.
"""
import math

import numpy as np
import pytest
import torch

import openmm_flowpert as fp
from openmm_flowpert.samplers import sigmoid_schedule

from conftest import standard_error_of_chain_means

SMC = dict(n_walkers=128, n_annealing_steps=60, k=(10, 2), k_eps=(10, 2), sweeps=2)


def _smc_runs(gmm, flow, estimator, seeds=(0, 1, 2, 3), **kw):
    out = []
    for seed in seeds:
        r = fp.FlowPerturbationSMC(flow, gmm.energy, estimator=estimator, seed=seed,
                                   **{**SMC, **kw}).run(progress=False)
        out.append((r.estimate((r.x[:, 0] < 0).double()), r.log_z, r.acceptance[-1], r.n_ancestors))
    a = np.asarray(out)
    n = len(seeds)
    return a[:, 0].mean(), a[:, 0].std(ddof=1) / math.sqrt(n), a[:, 1].mean(), a[:, 1].std(ddof=1) / math.sqrt(n), a


def test_sigmoid_schedule():
    b = sigmoid_schedule(100, 0.01)
    assert b[0] == pytest.approx(0.01) and b[-1] == pytest.approx(1.0) and np.all(np.diff(b) > 0)
    assert np.diff(b)[0] < np.diff(b)[50] > np.diff(b)[-1]  # dense at both ends


def test_smc_fp_reproduces_fraction_and_log_z(gmm, gmm_flow):
    frac, se, log_z, se_z, runs = _smc_runs(gmm, gmm_flow, "fp")
    assert abs(frac - 0.25) < 3 * max(se, 0.005), (frac, se)
    assert abs(log_z) < 3 * max(se_z, 0.005), (log_z, se_z)
    assert se < 0.04 and np.all(runs[:, 2] > 0.05) and np.all(runs[:, 3] > 1)


def test_smc_hutchinson_negative_control(gmm, gmm_flow):
    """The same protocol with Hutchinson(1) log-determinants: log Z is far from 0."""
    _, _, log_z, se_z, _ = _smc_runs(gmm, gmm_flow, "hutchinson")
    assert abs(log_z) > 4 * se_z and abs(log_z) > 0.2, (log_z, se_z)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["fp++", "jacobian"])
def test_smc_other_estimators(gmm, gmm_flow, estimator):
    frac, se, log_z, se_z, _ = _smc_runs(gmm, gmm_flow, estimator)
    assert abs(frac - 0.25) < 3 * max(se, 0.005) and abs(log_z) < 3 * max(se_z, 0.005)


def test_latent_mc_exact(gmm, gmm_flow):
    mc = fp.LatentMC(gmm_flow, gmm.energy, n_walkers=256, k=3, k_eps=2, seed=5)
    trace = mc.run(120, observable=lambda x: (x[:, 0] < 0).double())
    mean, se = standard_error_of_chain_means(trace[30:])
    assert abs(mean - 0.25) < 3 * se and se < 0.03, (mean, se)
    assert 0.05 < np.mean(mc.acceptance) < 0.95


def test_checkpoint_resume_is_identical(gmm, gmm_flow, tmp_path):
    """LatentMC and SMC interrupted and resumed from their checkpoints = uninterrupted runs."""
    full = fp.LatentMC(gmm_flow, gmm.energy, n_walkers=32, seed=2)
    ref = full.run(8)
    ck = str(tmp_path / "mc.pt")
    fp.LatentMC(gmm_flow, gmm.energy, n_walkers=32, seed=2, checkpoint=ck, checkpoint_every=2).run(5)
    resumed = fp.LatentMC(gmm_flow, gmm.energy, n_walkers=32, seed=2, checkpoint=ck)
    assert resumed.iteration == 5
    assert torch.equal(resumed.run(8), ref) and torch.equal(resumed.state.x, full.state.x)

    kw = dict(n_walkers=32, n_annealing_steps=6, k=(5, 2), k_eps=(5, 2), seed=3)
    a = fp.FlowPerturbationSMC(gmm_flow, gmm.energy, **kw).run(progress=False)
    ck2 = str(tmp_path / "smc.pt")
    calls = []

    def crashing_energy(x):  # the machine goes down during step 5 (1 + 2 sweeps per step)
        calls.append(1)
        if len(calls) > 1 + 2 * 4 + 1:
            raise KeyboardInterrupt
        return gmm.energy(x)

    with pytest.raises(KeyboardInterrupt):
        fp.FlowPerturbationSMC(gmm_flow, crashing_energy, checkpoint=ck2, checkpoint_every=2, **kw).run(progress=False)
    assert torch.load(ck2, weights_only=False)["step"] == 4
    b = fp.FlowPerturbationSMC(gmm_flow, gmm.energy, checkpoint=ck2, **kw).run(progress=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.weights, b.weights) and a.log_z == b.log_z
    with pytest.raises(ValueError, match="other settings"):
        fp.FlowPerturbationSMC(gmm_flow, gmm.energy, checkpoint=ck2, **{**kw, "seed": 4}).run(progress=False)


def test_smc_on_openmm_energies(gmm_system, gmm_system_flow):
    """FlowPerturbationSMC with OpenMM energies (ReducedPotential of the 12-D mixture System, a
    normalized target in kT: log Z = 0, fraction of particle 0 with x < 0 = 1/4): fp reproduces
    both; Hutchinson(1) with the same protocol is far off in log Z (negative control)."""
    from openmm_flowpert.energies import ReducedPotential

    rp = ReducedPotential(gmm_system.system, 300.0)
    kw = dict(n_walkers=128, n_annealing_steps=40, k=(12, 2), k_eps=(12, 2), sweeps=2)
    res = {}
    for est in ("fp", "hutchinson"):
        runs = [fp.FlowPerturbationSMC(gmm_system_flow, rp, estimator=est, seed=s, **kw).run(progress=False)
                for s in (0, 1, 2)]
        frac = np.array([r.estimate((r.x[:, 0, 0] < 0).double()) for r in runs])
        log_z = np.array([r.log_z for r in runs])
        res[est] = (frac.mean(), frac.std(ddof=1) / math.sqrt(3), log_z.mean(), log_z.std(ddof=1) / math.sqrt(3))
    frac, se, log_z, se_z = res["fp"]
    assert abs(frac - gmm_system.exact_fraction_left) < 3 * max(se, 0.005), res
    assert abs(log_z) < 3 * max(se_z, 0.005), res
    _, _, log_z_h, se_h = res["hutchinson"]
    assert abs(log_z_h) > 4 * se_h and abs(log_z_h) > 0.2, res
