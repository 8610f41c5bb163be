"""Population samplers on the 10-D two-well GMM: SMC on the weight exponent and latent MC.

References are exact: the fraction with x0 < 0 is 1/4, Z = 1 (the GMM is normalized) and <u> comes
from 200 000 exact samples.

Statistics (`_z`): z = (estimate - exact) / SE over independent replicas, SE from their spread, and
the bar is Student's t quantile for n - 1 degrees of freedom at the two-sided 0.27 % of 3 sigma
(`_bar`: 4.53 for 8 replicas, 5.51 for 6, 3.02 for 256), so a correct sampler fails a check with
probability 0.27 % on any build, however few the replicas. A negative control must exceed
max(4, bar). SMC replicas are independent runs; latent-MC replicas are independent chains (their
time averages: an autocorrelation-corrected SE).

SMC estimates Z without bias at any number of walkers, not log Z (log Z_hat is low by about
var(log Z_hat) / 2 = 0.003 here), so the tests average Z_hat = exp(log Z_hat). The weighted
fraction F_hat is consistent, not unbiased, but F_hat Z_hat is unbiased for Z / 4: its bias is
-Cov(F_hat, Z_hat) / Z, at most sd(F_hat) sd(Z_hat) = 0.037 x 0.08 = 0.003 at 128 walkers
(0.2 SE of 8 runs). MEASURED_BIAS

Measured z (each a separate set of seeds; the tests use the first; about S s per SMC run and
L s per latent-MC run on one core):

MEASURED_TABLE
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

import openmm_flowpert as fp
from openmm_flowpert.samplers import sigmoid_schedule

SMC = dict(n_walkers=128, n_annealing_steps=60, k=(10, 2), k_eps=(10, 2), sweeps=2)
SMC_SEEDS, CONTROL_SEEDS = range(8), range(6)
LMC = dict(n_walkers=256, k=3, k_eps=2)
LMC_ITERATIONS, LMC_BURN_IN = 160, 60


def _bar(n: int) -> float:
    """Student's t quantile, n - 1 degrees of freedom, two-sided 0.27 % (3 sigma of a normal)."""
    return float(student_t.ppf(1 - 0.0027 / 2, n - 1))


def _z(values, exact: float, exact_se: float = 0.0) -> dict:
    """mean, SE, z and bar of independent replicas against an exact value (with its own SE)."""
    v = np.asarray(values, dtype=np.float64)
    mean, se = float(v.mean()), math.hypot(float(v.std(ddof=1)) / math.sqrt(v.size), exact_se)
    return dict(mean=mean, se=se, z=(mean - exact) / se, bar=_bar(v.size))


def _smc_runs(flow, energy, left, estimator, seeds, **protocol) -> np.ndarray:
    """(fraction, Z_hat, final acceptance, distinct ancestors) of independent SMC runs, (runs, 4)."""
    out = []
    for seed in seeds:
        r = fp.FlowPerturbationSMC(flow, energy, estimator=estimator, seed=seed, **{**SMC, **protocol}).run(
            progress=False)
        out.append((r.estimate(left(r.x)), math.exp(r.log_z), r.acceptance[-1], r.n_ancestors))
    return np.asarray(out)


def _left_gmm(x):
    return (x[:, 0] < 0).double()


def test_sigmoid_schedule():
    b = sigmoid_schedule(100, 0.01)
    assert b[0] == pytest.approx(0.01) and b[-1] == pytest.approx(1.0) and np.all(np.diff(b) > 0)
    assert np.diff(b)[0] < np.diff(b)[50] > np.diff(b)[-1]  # dense at both ends


def test_smc_fp_reproduces_fraction_and_z(gmm, gmm_flow):
    runs = _smc_runs(gmm_flow, gmm.energy, _left_gmm, "fp", SMC_SEEDS)
    frac, z_hat = _z(runs[:, 0], 0.25), _z(runs[:, 1], 1.0)
    assert abs(frac["z"]) < frac["bar"] and abs(z_hat["z"]) < z_hat["bar"], (frac, z_hat)
    assert frac["se"] < 0.03 and z_hat["se"] < 0.06, (frac, z_hat)  # the test has power
    assert np.all(runs[:, 2] > 0.05) and np.all(runs[:, 3] > 1)


def test_smc_hutchinson_negative_control(gmm, gmm_flow):
    """The same protocol with Hutchinson(1) log-determinants: Z_hat is far from 1."""
    z_hat = _z(_smc_runs(gmm_flow, gmm.energy, _left_gmm, "hutchinson", CONTROL_SEEDS)[:, 1], 1.0)
    assert abs(z_hat["z"]) > max(4.0, z_hat["bar"]) and abs(z_hat["mean"] - 1) > 0.2, z_hat


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["fp++", "jacobian"])
def test_smc_other_estimators(gmm, gmm_flow, estimator):
    runs = _smc_runs(gmm_flow, gmm.energy, _left_gmm, estimator, SMC_SEEDS)
    frac, z_hat = _z(runs[:, 0], 0.25), _z(runs[:, 1], 1.0)
    assert abs(frac["z"]) < frac["bar"] and abs(z_hat["z"]) < z_hat["bar"], (frac, z_hat)
    assert frac["se"] < 0.03 and z_hat["se"] < 0.06, (frac, z_hat)


class _WideRedraw:
    """Noise whose partial redraws (latent-local proposals) draw from N(0, sigma^2) instead of N(0, 1);
    every other draw is the wrapped Noise's (as in tests/test_move_power.py)."""

    def __init__(self, noise, sigma):
        self._noise, self._sigma = noise, sigma

    def __getattr__(self, name):
        return getattr(self._noise, name)

    def partial_redraw(self, w, k, n_particles=0):
        new, _ = self._noise.partial_redraw(w, k)
        assert n_particles == 0  # the GMM flow is not mean-free
        return torch.where(new != w, self._sigma * new, w), None


class WideRedrawLatentMC(fp.LatentMC):
    """Test-only biased variant: latent-local proposals that are not reversible w.r.t. the prior."""

    sigma = 1.5

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.noise = _WideRedraw(self.noise, self.sigma)


def _latent_mc(gmm, flow, seed, cls=fp.LatentMC) -> tuple:
    """z of P(x0 < 0) and <u> from the chain means of LMC walkers after LMC_BURN_IN iterations, and
    the mean acceptance."""
    mc = cls(flow, gmm.energy, seed=seed, **LMC)
    trace = mc.run(LMC_ITERATIONS, observable=lambda x: torch.stack([_left_gmm(x), gmm.energy(x)], 1))
    chain_means = trace[LMC_BURN_IN:].mean(0).numpy()
    exact_u, exact_u_se = gmm.exact_mean_energy(200_000)
    return _z(chain_means[:, 0], 0.25), _z(chain_means[:, 1], exact_u, exact_u_se), float(np.mean(mc.acceptance))


def test_latent_mc_exact(gmm, gmm_flow):
    left, u, acceptance = _latent_mc(gmm, gmm_flow, seed=5)
    assert abs(left["z"]) < left["bar"] and abs(u["z"]) < u["bar"], (left, u)
    assert left["se"] < 0.03 and u["se"] < 0.15, (left, u)  # the test has power
    assert 0.05 < acceptance < 0.95


def test_latent_mc_wide_redraw_negative_control(gmm, gmm_flow):
    """Latent-local redraws from N(0, 1.5^2): the chain samples pi(x) exp(0.28 |w(x)|^2), wider wells."""
    left, u, _ = _latent_mc(gmm, gmm_flow, seed=5, cls=WideRedrawLatentMC)
    assert u["z"] > max(4.0, u["bar"]), (left, u)


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


OPENMM_SMC = dict(n_walkers=128, n_annealing_steps=40, k=(12, 2), k_eps=(12, 2), sweeps=2)


def test_smc_on_openmm_energies(gmm_system, gmm_system_flow):
    """FlowPerturbationSMC with OpenMM energies (ReducedPotential of the 12-D mixture System, a
    normalized target in kT: Z = 1, fraction of particle 0 with x < 0 = 1/4): fp reproduces both;
    Hutchinson(1) with the same protocol is far off in Z (negative control)."""
    from openmm_flowpert.energies import ReducedPotential

    rp = ReducedPotential(gmm_system.system, 300.0)

    def left(x):
        return (x[:, 0, 0] < 0).double()

    runs = _smc_runs(gmm_system_flow, rp, left, "fp", SMC_SEEDS, **OPENMM_SMC)
    frac, z_hat = _z(runs[:, 0], gmm_system.exact_fraction_left), _z(runs[:, 1], 1.0)
    assert abs(frac["z"]) < frac["bar"] and abs(z_hat["z"]) < z_hat["bar"], (frac, z_hat)
    assert frac["se"] < 0.03 and z_hat["se"] < 0.06, (frac, z_hat)
    control = _z(_smc_runs(gmm_system_flow, rp, left, "hutchinson", CONTROL_SEEDS, **OPENMM_SMC)[:, 1], 1.0)
    assert abs(control["z"]) > max(4.0, control["bar"]) and abs(control["mean"] - 1) > 0.2, control
