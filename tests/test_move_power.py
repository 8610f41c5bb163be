"""FlowPerturbationMove(proposal="latent") is exact on the 12-D Gaussian-mixture OpenMM System, and
the same test sees a known-biased latent proposal (docs/algorithm.md, sections 4.4 and 4.5).

Set-up: `gmm_system` (two wells, exact P(left) = 0.25 and exact mean reduced energy <u> = 7.54 kT)
and the fixture flow trained on 50/50 samples. N_CHAINS independent chains of the move, run in
openmmtools (a SamplerState each, the move's ``apply`` N_APPLY times; each apply is a refresh from
rho(u | x) and N_PROPOSALS latent-local steps, k = k_eps = 2, estimator "fp"), alone or after 50
steps of seeded Langevin dynamics per apply (slow). The chains start from exact samples of the
target: a kernel that leaves the target invariant then has unbiased averages at every step, and a
biased one drifts away within the run (the latent-local chain changes wells too slowly to relax a
50/50 start at an affordable size: P(left) would carry a burn-in bias). Standard errors come from
the spread of the chain means (autocorrelation-corrected), combined with the exact <u>'s own
(0.006 kT, 200 000 exact samples).

Negative control: the latent proposal redraws its coordinates from N(0, 1.5^2) instead of N(0, 1).
That kernel is reversible with respect to N(0, 1.5^2 I), not the prior, so the move samples x with
density proportional to pi(x) exp(0.28 |w(x)|^2) (w = f^-1(x) / s): wider wells, <u> higher by up
to d/2 (1.5^2 - 1) = 7.5 kT (measured +4.7 to +7.2 kT within the run). Two plausible biased
variants were measured first and are too weak to be seen at any affordable size with this flow
(its single-probe estimator noise is small): the uniform redraw of the auxiliary directions at the
refresh (section 4.6) gave <u> z = +0.28, +0.76 and P(left) z = +2.07, +0.81 (seeds 0, 1), and
Hutchinson's estimator (constructor check bypassed) <u> z = -0.39, P(left) z = 0.00 (seed 0), both
at 16 chains x 20 applies x 8 proposals from 50/50 starts, where the exact move gave <u> z between
-2.05 and +1.27 and P(left) z between -1.46 and +2.23 over seeds 0-5.

Measured at 16 chains x 8 applies x 16 proposals (z = (estimate - exact) / SE, seeds 0-5; the
tests use seed 0; about 30 s per run on one core):

    move alone, exact:    P(left) z = +0.58 -2.46 -0.09 -0.22 +0.88 +0.75
                          <u>     z = -0.50 -0.73 -2.10 -0.86 +0.61 +1.19   (SE 0.31-0.57 kT)
    move alone, control:  <u>     z = +7.75 +12.6 +5.91 +7.27 +10.1 +7.13   (SE 0.47-1.01 kT)
    with MD, exact:       P(left) z = -1.48 +0.54 -2.24 +1.60 -0.82         (seeds 0-4)
                          <u>     z = -0.35 -0.47 -1.26 +0.74 -0.95
    with MD, control:     <u>     z = +8.72 +5.97 +7.35 +6.33 +7.34

The P(left) z-scores spread a little wider than N(0, 1) (16 chain means of a slowly switching
indicator make a rough SE), hence the tests assert |z| < 3 for the exact move and z > 4 for the
control, as measured on every seed.
"""
import math

import numpy as np
import pytest
from openmm import unit
from openmmtools import cache, mcmc, states

from openmm_flowpert import FlowPerturbationMove
from openmm_flowpert.moves.langevin import SeededLangevinDynamicsMove

from conftest import WideRedrawNoise

N_CHAINS, N_APPLY, N_PROPOSALS = 16, 8, 16


class WideRedrawMove(FlowPerturbationMove):
    """Test-only biased variant: latent-local proposals that are not reversible w.r.t. the prior."""

    sigma = 1.5

    def _noise(self, x):
        return WideRedrawNoise(super()._noise(x), self.sigma)


def run_latent_chains(gmm_system, flow, seed, move_cls=FlowPerturbationMove, n_chains=N_CHAINS, n_apply=N_APPLY,
                      n_proposals=N_PROPOSALS, md_steps=0):
    """Independent chains of the latent move from exact samples (each apply preceded by md_steps of
    seeded Langevin dynamics if md_steps > 0); returns the indicator of the left well and the reduced
    energy after every apply, (n_apply, n_chains) each, and the move's counters."""
    move = move_cls(flow, n_proposals=n_proposals, proposal="latent", seed=seed)
    if md_steps:
        move = mcmc.SequenceMove([SeededLangevinDynamicsMove(
            seed=seed, timestep=2 * unit.femtoseconds, collision_rate=5 / unit.picoseconds, n_steps=md_steps,
            reassign_velocities=False), move])
    ts = states.ThermodynamicState(gmm_system.system, gmm_system.temperature)
    cc = cache.ContextCache(capacity=2)
    starts = gmm_system.sample(n_chains, seed=100 + seed)  # exact samples of the target, nm
    left = np.zeros((n_apply, n_chains))
    energy = np.zeros((n_apply, n_chains))
    for c in range(n_chains):
        ss = states.SamplerState(starts[c] * unit.nanometer)
        for i in range(n_apply):
            move.apply(ts, ss, cc)
            pos = ss.positions.value_in_unit(unit.nanometer)[None]
            left[i, c] = gmm_system.left(pos)[0]
            energy[i, c] = gmm_system.reduced_energy(pos)[0]
    return left, energy, (move.move_list[1] if md_steps else move).statistics


def z_scores(gmm_system, left, energy):
    """{"left": (mean, SE, z), "u": (mean, SE, z)}: P(left) and <u> against the exact values, SE
    from the spread of the chain means (combined with the exact <u>'s own sampling error)."""
    exact_u, exact_u_se = gmm_system.exact_mean_reduced_energy(200_000)
    out = {}
    for name, values, exact, exact_se in [("left", left, gmm_system.exact_fraction_left, 0.0),
                                          ("u", energy, exact_u, exact_u_se)]:
        m = values.mean(0)
        mean, se = float(m.mean()), math.hypot(float(m.std(ddof=1) / math.sqrt(m.size)), exact_se)
        out[name] = (mean, se, (mean - exact) / se)
    return out


# slow (about 1 min each): the latent kernel (metropolis.latent_step, which the move calls) is exact by
# default in tests/test_metropolis.py::test_gmm_fraction_left_exact[latent-fp]
@pytest.mark.slow
@pytest.mark.parametrize("md_steps", [0, 50])
def test_latent_move_is_exact_on_gmm_system(gmm_system, gmm_system_flow, md_steps):
    left, energy, stats = run_latent_chains(gmm_system, gmm_system_flow, seed=0, md_steps=md_steps)
    res = z_scores(gmm_system, left, energy)
    assert abs(res["left"][2]) < 3 and abs(res["u"][2]) < 3, res
    assert res["u"][1] < 0.8 and res["left"][1] < 0.12, res                # the test has power
    assert stats["n_proposed"] == N_CHAINS * N_APPLY * N_PROPOSALS
    assert 0.3 * stats["n_proposed"] < stats["n_accepted"] < 0.7 * stats["n_proposed"], stats
    assert stats["n_refresh_failed"] == 0 and stats["n_nonfinite"] == 0, stats


# slow (about 1 min each): the latent kernel (metropolis.latent_step, which the move calls) is exact by
# default in tests/test_metropolis.py::test_gmm_fraction_left_exact[latent-fp]
@pytest.mark.slow
@pytest.mark.parametrize("md_steps", [0, 50])
def test_latent_move_with_wide_redraw_is_biased_negative_control(gmm_system, gmm_system_flow, md_steps):
    left, energy, _ = run_latent_chains(gmm_system, gmm_system_flow, seed=0, move_cls=WideRedrawMove,
                                        md_steps=md_steps)
    res = z_scores(gmm_system, left, energy)
    assert res["u"][2] > 4, res
