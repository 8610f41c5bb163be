"""Population samplers on the 10-D two-well GMM and on the same mixture as an OpenMM System: SMC on
the weight exponent and latent MC (docs/algorithm.md, sections 4.4 and 7).

References are exact: the fraction with x0 < 0 is 1/4 and log Z = 0 (both mixtures are normalized);
<u> comes from 200 000 exact samples.

Statistics (`_z`): z = (estimate - exact) / SE over n independent replicas, SE from their spread.
The bar is Student's t quantile for n - 1 degrees of freedom at the two-sided 0.27 % of 3 sigma
(`_bar`: 3.59 for 16 replicas, 3.85 for 12, 3.02 for 256), so an exact sampler fails a check with
probability about 0.27 % on any build, however few the replicas; a negative control must exceed
max(4, bar). SMC replicas are independent runs with fixed seeds; latent-MC replicas are the time
averages of independent chains (an autocorrelation-corrected SE).

Finite-walker bias. SMC estimates Z without bias, not log Z: log Z_hat is low by about
var(log Z_hat) / 2 (0.006 at 128 walkers x 30 steps), so `_z` adds s^2 / 2 to its mean (exact for
a log-normal Z_hat). The weighted fraction F_hat is only consistent, but F_hat Z_hat is unbiased for
the exact fraction times Z = 1, so the replicas (F_hat - 1/4) Z_hat have mean exactly 0 at any
size. F_hat's own bias is -Cov(F_hat, Z_hat): +0.003 on the OpenMM mixture (correlation -0.50,
0.2 SE of 12 runs), 0.000 on the GMM. The -2.0 SE of F_hat over 12 runs of the former protocol
(128 walkers x 60 steps) was a fluctuation: 80 runs gave 0.2463 +- 0.0044, and 60 runs of 256 x 30
0.2498 +- 0.0039. Hutchinson(1) runs now and then give a huge log Z_hat (3.45 in 1 of 40 runs at
128 x 60, 2.50 in 1 of 60 at 128 x 30), which inflates their spread; the set of 12 runs holding it
still gives z = 7.2.

Latent MC starts from the flow's 50/50 wells and relaxes to 1/4 with a time constant of about
16 iterations; the tests discard 60 of 160 (the remaining burn-in bias is about 0.1 SE).

Measured z over five disjoint seed sets (the tests use the first); one core: about 3 s per fp SMC
run, 1 s per Hutchinson run, 15 s per latent-MC run of 256 chains; an SMC fraction z is that of
the replicas (F_hat - 1/4) Z_hat:

    GMM SMC fp, 16 runs (seeds 0-15, 16-31, ..., 64-79)
        fraction  z = -0.72 -0.66 -0.31 +1.72 -0.52
        log Z     z = -0.68 +0.24 -0.56 -1.77 +0.35
    GMM SMC Hutchinson(1), 12 runs (seeds 0-11, ..., 48-59)
        log Z     z = +18.9 +11.9 +7.16 +16.8 +17.1
    GMM SMC fp++ (slow), 16 runs
        fraction  z = +0.70 +1.84 +0.12 -0.94 -1.24
        log Z     z = -0.70 +0.66 -1.63 -2.59 +0.06
    GMM SMC jacobian (slow), 16 runs
        fraction  z = -0.06 +0.83 -2.43 +0.50 -0.01
        log Z     z = +1.39 -0.43 +1.15 -0.07 +0.06
    latent MC, 256 chains (seeds 5-9)
        P(left)   z = +0.54 +1.17 -0.46 -0.58 -1.18
        <u>       z = -0.48 +0.89 -0.58 +0.82 +0.63
    latent MC, redraws from N(0, 1.5^2), 64 chains (seeds 5-9)
        <u>       z = +14.5 +15.2 +13.1 +15.7 +15.0   (P(left) z = -0.46 -2.26 -3.41 -3.75 -4.44)
    OpenMM SMC fp, 12 runs (seeds 0-11, ..., 48-59)
        fraction  z = +0.42 -2.35 +0.34 +1.31 +0.10
        log Z     z = +1.04 +0.89 -1.36 -0.41 +0.55
    OpenMM SMC Hutchinson(1), 12 runs
        log Z     z = +13.6 +15.4 +18.0 +8.74 +7.97
    GMM d = 100, exact 50/50 field, SMC fp++, 16 runs of 128 x 3 (seeds 0-15, ..., 64-79)
        fraction  z = -0.53 -1.50 +0.79 -0.74 -2.41
        log Z     z = -1.25 +2.56 -0.75 +0.05 +0.71
    GMM d = 100, exact 50/50 field, SMC Hutchinson(1), 6 runs of 64 x 3 (seeds 0-5, ..., 24-29)
        log Z     z = +25.7 +26.6 +29.9 +19.8 +23.8

Sizes: 16 runs of 128 walkers x 30 steps cost about as much as 8 runs of 256 x 30 and resolve the
same bias in the fraction (bar x SE = 0.046 vs 0.048), with a steadier SE (15 degrees of freedom):
of five sets of 8 runs of 128 x 60, one gave log Z z = -5.2 (runs that all missed the right tail of
Z_hat, skewness 0.9).
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

import openmm_flowpert as fp
from openmm_flowpert.samplers import sigmoid_schedule
from openmm_flowpert.testsystems import GaussianMixtureField, GaussianMixtureTarget

from conftest import WideRedrawNoise

SMC = dict(n_walkers=128, n_annealing_steps=30, k=(10, 2), k_eps=(10, 2), sweeps=2)
SMC_SEEDS, CONTROL_SEEDS = range(16), range(12)
LMC = dict(k=3, k_eps=2)
LMC_ITERATIONS, LMC_BURN_IN = 160, 60


def _bar(n: int) -> float:
    """Student's t quantile, n - 1 degrees of freedom, two-sided 0.27 % (3 sigma of a normal)."""
    return float(student_t.ppf(1 - 0.0027 / 2, n - 1))


def _z(values, exact: float, exact_se: float = 0.0, log_normal: bool = False) -> dict:
    """mean, SE, z and bar of independent replicas against an exact value (with its own SE).

    ``log_normal``: the values are log Z_hat of an estimator unbiased in Z_hat; the mean is raised by
    s^2 / 2 (s their spread), which makes it estimate log E[Z_hat] = log Z for log-normal Z_hat."""
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1))
    mean = float(v.mean()) + (sd * sd / 2 if log_normal else 0.0)
    se = math.hypot(sd / math.sqrt(v.size), exact_se)
    return dict(mean=mean, se=se, z=(mean - exact) / se, bar=_bar(v.size))


def _smc_z(flow, energy, left, exact_fraction, estimator, seeds, **protocol) -> tuple:
    """Independent SMC runs: z of the fraction on the left and of log Z (= 0), final acceptances and
    surviving ancestors per run.

    The fraction's replicas are (F_hat - exact) Z_hat, of mean exactly 0 at any number of walkers
    (F_hat Z_hat is unbiased for the exact fraction times Z = 1); F_hat alone is only consistent."""
    runs = []
    for seed in seeds:
        r = fp.FlowPerturbationSMC(flow, energy, estimator=estimator, seed=seed, **{**SMC, **protocol}).run(
            progress=False)
        runs.append((r.estimate(left(r.x)), r.log_z, r.acceptance[-1], r.n_ancestors))
    runs = np.asarray(runs)
    frac = _z((runs[:, 0] - exact_fraction) * np.exp(runs[:, 1]), 0.0)
    frac["fraction"] = float(runs[:, 0].mean())
    return frac, _z(runs[:, 1], 0.0, log_normal=True), runs[:, 2], runs[:, 3]


def _left_gmm(x):
    return (x[:, 0] < 0).double()


def test_sigmoid_schedule():
    b = sigmoid_schedule(100, 0.01)
    assert b[0] == pytest.approx(0.01) and b[-1] == pytest.approx(1.0) and np.all(np.diff(b) > 0)
    assert np.diff(b)[0] < np.diff(b)[50] > np.diff(b)[-1]  # dense at both ends


@pytest.mark.slow  # d = 100 exact-field SMC (fp++) and its control cover SMC by default
def test_smc_fp_reproduces_fraction_and_log_z(gmm, gmm_flow):
    frac, log_z, acceptance, ancestors = _smc_z(gmm_flow, gmm.energy, _left_gmm, 0.25, "fp", SMC_SEEDS)
    assert abs(frac["z"]) < frac["bar"] and abs(log_z["z"]) < log_z["bar"], (frac, log_z)
    assert frac["se"] < 0.025 and log_z["se"] < 0.07, (frac, log_z)  # the test has power
    assert np.all(acceptance > 0.05) and np.all(ancestors > 1)


@pytest.mark.slow  # d = 100 exact-field SMC (fp++) and its control cover SMC by default
def test_smc_hutchinson_negative_control(gmm, gmm_flow):
    """The same protocol with Hutchinson(1) log-determinants: log Z is far from 0."""
    _, log_z, _, _ = _smc_z(gmm_flow, gmm.energy, _left_gmm, 0.25, "hutchinson", CONTROL_SEEDS)
    assert log_z["z"] > max(4.0, log_z["bar"]) and log_z["mean"] > 0.2, log_z


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["fp++", "jacobian"])
def test_smc_other_estimators(gmm, gmm_flow, estimator):
    frac, log_z, _, _ = _smc_z(gmm_flow, gmm.energy, _left_gmm, 0.25, estimator, SMC_SEEDS)
    assert abs(frac["z"]) < frac["bar"] and abs(log_z["z"]) < log_z["bar"], (frac, log_z)
    assert frac["se"] < 0.025 and log_z["se"] < 0.07, (frac, log_z)


class WideRedrawLatentMC(fp.LatentMC):
    """Test-only biased variant: latent-local proposals that are not reversible w.r.t. the prior."""

    sigma = 1.5

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.noise = WideRedrawNoise(self.noise, self.sigma)


def _latent_mc(gmm, flow, n_walkers, cls=fp.LatentMC, seed=5) -> tuple:
    """z of P(x0 < 0) and <u> from the chain means of n_walkers independent chains after
    LMC_BURN_IN iterations, and the mean acceptance."""
    mc = cls(flow, gmm.energy, n_walkers=n_walkers, seed=seed, **LMC)
    trace = mc.run(LMC_ITERATIONS, observable=lambda x: torch.stack([_left_gmm(x), gmm.energy(x)], 1))
    chain_means = trace[LMC_BURN_IN:].mean(0).numpy()
    exact_u, exact_u_se = gmm.exact_mean_energy(200_000)
    return _z(chain_means[:, 0], 0.25), _z(chain_means[:, 1], exact_u, exact_u_se), float(np.mean(mc.acceptance))


def test_latent_mc_exact(gmm, gmm_flow):
    left, u, acceptance = _latent_mc(gmm, gmm_flow, 256)
    assert abs(left["z"]) < left["bar"] and abs(u["z"]) < u["bar"], (left, u)
    assert left["se"] < 0.03 and u["se"] < 0.15, (left, u)  # the test has power
    assert 0.05 < acceptance < 0.95


def test_latent_mc_wide_redraw_negative_control(gmm, gmm_flow):
    """Latent-local redraws from N(0, 1.5^2): the chains sample about pi(x) exp(0.28 |w(x)|^2), wider wells."""
    left, u, _ = _latent_mc(gmm, gmm_flow, 64, WideRedrawLatentMC)
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


OPENMM_SMC = dict(n_walkers=128, n_annealing_steps=20, k=(12, 2), k_eps=(12, 2), sweeps=2)
OPENMM_SEEDS = range(12)


def _openmm_smc(gmm_system, flow, estimator, seeds):
    from openmm_flowpert.energies import ReducedPotential

    def left(x):
        return (x[:, 0, 0] < 0).double()

    return _smc_z(flow, ReducedPotential(gmm_system.system, 300.0), left, gmm_system.exact_fraction_left, estimator,
                  seeds, **OPENMM_SMC)


@pytest.mark.slow   # ~70 s (the d = 100 exact-field SMC tests cover SMC in the default run)
def test_smc_on_openmm_energies(gmm_system, gmm_system_flow):
    """FlowPerturbationSMC with OpenMM energies (ReducedPotential of the 12-D mixture System, a
    normalized target in kT: log Z = 0, fraction of particle 0 with x < 0 = 1/4) reproduces both."""
    frac, log_z, acceptance, ancestors = _openmm_smc(gmm_system, gmm_system_flow, "fp", OPENMM_SEEDS)
    assert abs(frac["z"]) < frac["bar"] and abs(log_z["z"]) < log_z["bar"], (frac, log_z)
    assert frac["se"] < 0.025 and log_z["se"] < 0.07, (frac, log_z)
    assert np.all(acceptance > 0.05) and np.all(ancestors > 1)


@pytest.mark.slow
def test_smc_on_openmm_energies_hutchinson_negative_control(gmm_system, gmm_system_flow):
    """The same protocol with Hutchinson(1) log-determinants: log Z is far from 0."""
    _, log_z, _, _ = _openmm_smc(gmm_system, gmm_system_flow, "hutchinson", CONTROL_SEEDS)
    assert log_z["z"] > max(4.0, log_z["bar"]) and log_z["mean"] > 0.2, log_z


# -- d = 100 on the exact flow-matching field (docs/algorithm.md section 12) ------------------------------
EXACT_FIELD_STEPS = 32
EXACT_SMC = dict(n_walkers=128, n_annealing_steps=3, k=(10, 2), k_eps=(10, 2), sweeps=1)
EXACT_SEEDS, EXACT_CONTROL_SEEDS = range(16), range(6)
EXACT_CONTROL_SMC = dict(n_walkers=64, n_annealing_steps=3, k=(10, 2), k_eps=(10, 2), sweeps=2)


@pytest.fixture(scope="module")
def gmm100_exact():
    """The 100-D GMM (weights 1/4, 3/4) and the flow of its exact 50/50 flow-matching field: 32 RK4
    steps on the quadratic grid, no training."""
    target = GaussianMixtureTarget(dim=100)
    return target, GaussianMixtureField.from_target(target, weights=(0.5, 0.5)).build_flow(EXACT_FIELD_STEPS)


def test_smc_fp_pp_exact_field_d100(gmm100_exact):
    """FlowPerturbationSMC with fp++ (exact solve, the default) on the 100-D mixture with the exact 50/50
    field reproduces the fraction with x0 < 0 and log Z = 0 (16 runs of 128 walkers x 3 steps, one sweep).

    Sizes: at d = 100 fp's log W spreads by about 9 nats (useless), fp++'s by 1.7 at 32 steps and by 2.4 at
    16 (where 8 runs of 256 x 5 gave a 2.6 times larger fraction SE than at 32 steps); walkers buy
    more than annealing steps or sweeps here. Measured over five seed sets (seeds 0-15, ..., 64-79), one core,
    about 35 s per set: fraction z = -0.53 -1.50 +0.79 -0.74 -2.41 (SE 0.020 0.022 0.019 0.023 0.016),
    log Z z = -1.25 +2.56 -0.75 +0.05 +0.71 (SE 0.046 0.079 0.052 0.072 0.047); final acceptance >= 0.70,
    >= 42 surviving ancestors per run."""
    target, flow = gmm100_exact
    frac, log_z, acceptance, ancestors = _smc_z(flow, target.energy, _left_gmm, target.exact_fraction_left,
                                                "fp++", EXACT_SEEDS, **EXACT_SMC)
    assert abs(frac["z"]) < frac["bar"] and abs(log_z["z"]) < log_z["bar"], (frac, log_z)
    assert frac["se"] < 0.04 and log_z["se"] < 0.12, (frac, log_z)  # power: an unweighted 0.5 is > 6 SE off
    assert np.all(acceptance > 0.3) and np.all(ancestors > 10)


def test_smc_hutchinson_exact_field_d100_negative_control(gmm100_exact):
    """The same flow with Hutchinson(1) log-determinants (6 runs of 64 walkers x 3 steps): log Z is far
    from 0 (its log W spreads by 14 nats at d = 100). Measured over five seed sets (seeds 0-5, ...,
    24-29), about 5 s each: log Z z = +25.7 +26.6 +29.9 +19.8 +23.8 (mean 37 to 50, bar 5.51)."""
    target, flow = gmm100_exact
    _, log_z, _, _ = _smc_z(flow, target.energy, _left_gmm, target.exact_fraction_left, "hutchinson",
                            EXACT_CONTROL_SEEDS, **EXACT_CONTROL_SMC)
    assert log_z["z"] > max(4.0, log_z["bar"]) and log_z["mean"] > 1.0, log_z
