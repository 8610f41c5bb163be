"""Hybrid MD + flow-perturbation MC is exact only with the rho(u | x) refresh (docs/algorithm.md sections 4 and 9).

Target (one particle, OpenMM CustomExternalForce): x0 ~ 0.8 N(-2, 0.3^2) + 0.2 N(+2, 0.3^2) in nm,
x1, x2 ~ N(0, 0.3^2); the barrier (~22 kT) is never crossed by the Langevin moves. The flow is a
deliberately anisotropic linear map (singular values 1.6, 0.4, 0.15, shifted toward the minor
well). Each iteration: LangevinDynamicsMove, then one FP independence proposal. Exact reference:
P(x0 < 0) = 0.8 (tails beyond the barrier are < 1e-10). Negative control: the same move with u
redrawn uniformly after MD ("Monte Carlo within Metropolis"), which a numpy study of this set-up
put 7-10 standard errors low (bias about -0.16) at this budget.

These two run FlowPerturbationMove and OpenMM's Langevin integrator end to end (about 1.5 min each
on one core), so they are marked slow. The Langevin moves are seeded (SeededLangevinDynamicsMove), so
both tests are deterministic. With
unseeded MD the control once came out only 3.85 SE low and failed its 4 SE bar. Measured with
seeded MD: seed 11 gives +0.22 SE (exact refresh) and -5.75 SE (uniform refresh); seed 12 gives
-1.00 and -6.39.

A linear flow has a constant Jacobian, so rho(u | x) is the same everywhere: a refresh at the wrong
point would pass those tests. The second half uses a *nonlinear* flow with FP++ (one direction per
integrator step): a y0-dependent rotation of the (y1, y2) plane, volume preserving but with a
strongly position-dependent shear, so that rho(u_k | x) changes from point to point. There the
refresh is tested through the library's batched path (``refreshed_state`` + ``independent_step``)
with an idealized x-move (an exact redraw within the current well, which leaves pi invariant like
an equilibrating MD segment), on 256 chains at once.
"""
import math

import numpy as np
import openmm
import pytest
import scipy.linalg
import torch
from openmm import unit
from openmmtools import cache, states

import openmm_flowpert as fp
from openmm_flowpert import FlowPerturbationMove
from openmm_flowpert.flow import Affine, time_grid
from openmm_flowpert.metropolis import ChainState, independent_step, log_weights, reduced_energies, refreshed_state
from openmm_flowpert.moves.langevin import SeededLangevinDynamicsMove
from openmm_flowpert.noise import Noise
from openmm_flowpert.perturbed_flow import Proposal

from conftest import z_of_chain_means

A = np.array([[1.541, 0.3258, 0.2686], [-0.05376, 0.3052, 0.1462], [0.0191, 0.1041, 0.2493]])
B_SHIFT = np.array([1.0, 0.0, 0.0])
N_CHAINS, N_ITER = 32, 250


class LinearVelocity(torch.nn.Module):
    def __init__(self, L: np.ndarray):
        super().__init__()
        self.dim = L.shape[0]
        self.register_buffer("L", torch.as_tensor(L, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.L.T


class UniformRefreshMove(FlowPerturbationMove):
    """Test-only biased variant: after MD, u is redrawn uniformly instead of from rho(u | x)."""

    def _refresh_auxiliary(self, x, noise, kw):
        z = self.flow.inverse(x)
        w = z / kw["prior_scale"]
        eps = noise.gaussian(1, self.flow.dim, sets=self.flow.n_probe_sets(kw["estimator"]))
        xx, log_q = self.flow.evaluate(w, eps, **kw)
        return Proposal(xx, log_q, w, eps)


def _double_well_system():
    kT = unit.MOLAR_GAS_CONSTANT_R * 300 * unit.kelvin
    expr = ("kT*(-log(0.8*exp(-(x+2)^2/(2*s2)) + 0.2*exp(-(x-2)^2/(2*s2))) + (y^2+z^2)/(2*s2));"
            "s2=0.09")
    force = openmm.CustomExternalForce(expr)
    force.addGlobalParameter("kT", kT.value_in_unit(unit.kilojoule_per_mole))
    force.addParticle(0, [])
    system = openmm.System()
    system.addParticle(12.0)
    system.addForce(force)
    return system


@pytest.fixture(scope="module")
def linear_flow(tmp_path_factory):
    flow = fp.PerturbedFlow.build(LinearVelocity(scipy.linalg.logm(A).real), time_grid(8, "uniform"),
                                  transform=Affine(torch.as_tensor(B_SHIFT), torch.ones(1)), n_atoms=1)
    flow.save(tmp_path_factory.mktemp("linear") / "linear.pt")
    return flow


def _run(move_cls, flow, seed, selection="metropolis"):
    system = _double_well_system()
    ts = states.ThermodynamicState(system, 300 * unit.kelvin)
    cc = cache.ContextCache(capacity=2)
    md = SeededLangevinDynamicsMove(seed=seed, timestep=50 * unit.femtoseconds, collision_rate=5 / unit.picoseconds,
                                    n_steps=40, reassign_velocities=False)
    flow_move = move_cls(flow, n_proposals=1, estimator="fp", seed=seed, platform="Reference", selection=selection)
    rng = np.random.default_rng(seed)
    left = np.zeros((N_ITER, N_CHAINS))
    for c in range(N_CHAINS):
        start = np.array([[2.0 + 0.3 * rng.standard_normal(), 0.3 * rng.standard_normal(),
                           0.3 * rng.standard_normal()]])
        ss = states.SamplerState(start * unit.nanometer)
        for i in range(N_ITER):
            md.apply(ts, ss, cc)
            flow_move.apply(ts, ss, cc)
            left[i, c] = ss.positions.value_in_unit(unit.nanometer)[0, 0] < 0
    m = left[N_ITER // 4:].mean(0)
    return float(m.mean()), float(m.std(ddof=1) / math.sqrt(N_CHAINS)), flow_move


@pytest.mark.slow
def test_hybrid_md_fp_exact_with_rho_refresh(linear_flow):
    mean, se, move = _run(FlowPerturbationMove, linear_flow, seed=11)
    assert abs(mean - 0.8) < 3 * se, (mean, se, move.statistics)
    assert move.n_accepted > 50  # the flow moves do carry chains between wells


@pytest.mark.slow
def test_uniform_refresh_after_md_is_biased_negative_control(linear_flow):
    mean, se, _ = _run(UniformRefreshMove, linear_flow, seed=11)
    assert mean - 0.8 < -4 * se, (mean, se)


@pytest.mark.slow
@pytest.mark.parametrize("refresh", ["rho", "uniform"])
def test_hybrid_md_weighted_draw_needs_the_rho_refresh(linear_flow, refresh):
    """The same two runs with the move's default rule, selection="weights" (with one proposal: a
    draw between the current state and the proposal in proportion to W). Exact with the rho(u | x)
    refresh; the uniform redraw of u (negative control) is > 4 SE low. Measured z, 2026-12-06:
    seed 11 -0.58 (rho), -7.51 (uniform); seed 12 +0.97, -4.99."""
    cls = FlowPerturbationMove if refresh == "rho" else UniformRefreshMove
    mean, se, move = _run(cls, linear_flow, seed=11, selection="weights")
    if refresh == "rho":
        assert abs(mean - 0.8) < 3 * se, (mean, se, move.statistics)
        assert move.n_accepted > 50
    else:
        assert mean - 0.8 < -4 * se, (mean, se)


# -- FP++ through a nonlinear flow: the refresh must be drawn at the current latent point -----------

S2 = 0.09  # nm^2: the variance of each well in x0 and of x1, x2


class ShearedRotationVelocity(torch.nn.Module):
    """v(t, y) = L y + beta sin(3 y0) R y, R the rotation generator of the (y1, y2) plane.

    The rotation by an angle that depends on y0 preserves volume and leaves an isotropic (y1, y2)
    density unchanged, so the flow still covers the target (acceptance ~8 % with FP++), but its
    Jacobian carries a shear proportional to |(y1, y2)| whose size changes from well to well: the
    per-step laws rho(u_k | x) differ from point to point."""

    def __init__(self, beta: float = 3.0):
        super().__init__()
        self.dim = 3
        self.register_buffer("L", torch.diag(torch.log(torch.tensor([1.6, 0.3, 0.3], dtype=torch.float64))))
        self.register_buffer("R", torch.tensor([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64))
        self.beta = beta

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.L.T + self.beta * torch.sin(3.0 * y[:, :1]) * (y @ self.R.T)


def _reduced_double_well(x: torch.Tensor) -> torch.Tensor:
    """u(x) in kT of the System above (up to a constant), x (B, 1, 3) nm."""
    x = x.reshape(-1, 3)
    wells = 0.8 * torch.exp(-(x[:, 0] + 2) ** 2 / (2 * S2)) + 0.2 * torch.exp(-(x[:, 0] - 2) ** 2 / (2 * S2))
    return -torch.log(wells) + (x[:, 1] ** 2 + x[:, 2] ** 2) / (2 * S2)


def _redraw_within_well(x: torch.Tensor, noise: Noise) -> torch.Tensor:
    """The idealized x-move: an exact draw from pi restricted to the current well (x (B, 1, 3) nm)."""
    centre = torch.zeros_like(x)
    centre[..., 0] = torch.where(x[..., 0] < 0, -2.0, 2.0)
    return centre + math.sqrt(S2) * noise.gaussian(x.shape[0], 3).reshape(x.shape)


@pytest.fixture(scope="module")
def sheared_flow():
    return fp.PerturbedFlow.build(ShearedRotationVelocity(), time_grid(4, "uniform"),
                                  transform=Affine(torch.tensor([-1.0, 0.0, 0.0]), torch.ones(1)), n_atoms=1)


def _refresh(variant: str, flow, x, x_before, noise, kw) -> ChainState:
    """The state at x after the x-move: exact (u ~ rho(u | x)), or one of the two biased variants,
    u redrawn uniformly, or u drawn from rho(u | x_before) at the stale latent point."""
    state = refreshed_state(flow, _reduced_double_well, x, noise, **kw)
    if variant == "exact":
        return state
    if variant == "uniform":
        eps = noise.gaussian(x.shape[0], flow.dim, sets=flow.n_probe_sets(kw["estimator"]))
    else:
        eps = flow.refresh(x_before, noise, **kw).eps
    _, log_q = flow.evaluate(state.w, eps, **kw)
    u = reduced_energies(_reduced_double_well, x)
    return ChainState(w=state.w, eps=eps, x=x, reduced_energy=u, log_w=log_weights(u, log_q))


def _hybrid_chains(flow, variant: str, seed: int, n_chains: int = 256, n_iter: int = 150):
    """Chains started from exact samples of pi; each iteration: x-move, refresh, one FP++
    independence proposal. Returns the chain means of 1[x0 < 0] and of x1^2 + x2^2 (nm^2)."""
    noise = Noise(seed)
    x = torch.zeros(n_chains, 1, 3, dtype=torch.float64)
    x[:, 0, 0] = torch.where(noise.uniform(n_chains) < 0.8, -2.0, 2.0)
    left, r2 = torch.zeros(n_iter, n_chains), torch.zeros(n_iter, n_chains)
    kw = dict(estimator="fp++")
    for i in range(n_iter):
        x_before, x = x, _redraw_within_well(x, noise)
        state = _refresh(variant, flow, x, x_before, noise, kw)
        independent_step(flow, _reduced_double_well, state, noise, **kw)
        x = state.x.reshape(n_chains, 1, 3)
        left[i], r2[i] = (x[:, 0, 0] < 0).double(), x[:, 0, 1] ** 2 + x[:, 0, 2] ** 2
    return left.mean(0).double(), r2.mean(0).double()



def test_hybrid_fp_plus_plus_exact_through_a_nonlinear_flow(sheared_flow):
    """Exact: P(x0 < 0) = 0.8 and E[x1^2 + x2^2] = 2 * 0.09 nm^2, within 3 SE (chain means).

    Measured z (fraction; x1^2 + x2^2) over seeds 1-7: within [-1.18, +1.19] and [-0.94, +1.19]."""
    left, r2 = _hybrid_chains(sheared_flow, "exact", seed=3)
    z_left, z_r2 = z_of_chain_means(left, 0.8), z_of_chain_means(r2, 2 * S2)
    assert abs(z_left) < 3 and abs(z_r2) < 3, (z_left, z_r2)


@pytest.mark.parametrize("variant", ["uniform", "stale"])
def test_hybrid_refresh_at_the_wrong_law_is_biased_negative_control(sheared_flow, variant):
    """The same chains with u redrawn uniformly, or from rho(u | x) at the point before the x-move:
    x1^2 + x2^2 comes out low (the chain leaves the noisier large-radius states too readily).

    Measured z of x1^2 + x2^2 over seeds 1-7: uniform -19.7 to -23.9, stale -20.9 to -22.3 (the
    fraction moves too, +3.2 to +4.9 and +1.0 to +3.4 SE, but x1^2 + x2^2 is the sharp observable)."""
    _, r2 = _hybrid_chains(sheared_flow, variant, seed=3)
    assert z_of_chain_means(r2, 2 * S2) < -4, z_of_chain_means(r2, 2 * S2)


def test_run_hybrid_records_each_applys_points_and_draw_law(tmp_path):
    """record_candidates=True keeps, per iteration, the current state plus the proposals with the law
    of the weighted draw (rows sum to 1, row 0 is where the apply started). A resumed run continues
    them, and the option is refused without selection='weights'."""
    from openmm_flowpert.samplers.hybrid import run_hybrid
    from openmm_flowpert.systems import alanine_dipeptide, bundled_flow

    ms = alanine_dipeptide("vacuum")
    kw = dict(md_steps=5, n_proposals=4, seed=3, selection="weights", record_candidates=True, progress=False,
              checkpoint=str(tmp_path / "ck.npz"), checkpoint_every=2)
    r = run_hybrid(ms.system, ms.positions, 300.0, bundled_flow("alanine-dipeptide"), n_iterations=2, **kw)
    r = run_hybrid(ms.system, ms.positions, 300.0, bundled_flow("alanine-dipeptide"), n_iterations=4, **kw)
    assert r.candidate_positions.shape == (4, 5, 22, 3) and r.candidate_energies.shape == (4, 5)
    assert np.allclose(r.candidate_probabilities.sum(1), 1.0) and np.all(r.candidate_probabilities >= 0)
    m, se, ess = r.recycled_mean(lambda x: x[:, 0, 0])
    assert np.isfinite(m) and se >= 0 and ess > 0
    with pytest.raises(ValueError, match="selection='weights'"):
        run_hybrid(ms.system, ms.positions, 300.0, bundled_flow("alanine-dipeptide"), n_iterations=1,
                   record_candidates=True, progress=False, selection="metropolis")



def test_run_hybrid_with_flow_moves_repeats_bit_for_bit_in_another_process(tmp_path):
    """The same seeded hybrid run in this process and in a fresh one gives the same trajectory bit for
    bit (it did not while the flow move's energy contexts reseeded OpenMM's process-wide generator:
    every MD segment after the first flow move then differed between processes)."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "scripts", "hybrid_run.py")
    subprocess.run([sys.executable, script, str(tmp_path / "x.npy")], check=True, capture_output=True, timeout=600)
    sys.path.insert(0, os.path.dirname(script))
    try:
        import hybrid_run
    finally:
        sys.path.pop(0)
    here = hybrid_run.positions()
    assert here.shape == (4, 22, 3)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), here)
