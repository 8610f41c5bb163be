"""The chain's domain is the same in both directions (issue 14, edge cases 1-2).

A flow move can weigh a current state only if the exact inverse of its positions converges; a
proposal it accepts must therefore pass the same test, or the move could enter states it can
never leave (and a step that is not one-to-one could hand the refresh another preimage). The flow
here is built to fail on part of space: an Euler step y -> y (1 + 1.5 sigmoid(4 y0)) is one-to-one
but its fixed-point inverse without Anderson mixing diverges where the gate is open (y0 > 0).
"""
import numpy as np
import torch
from openmm import unit
from openmmtools import cache, states

import openmm_flowpert as fp
from openmm_flowpert.flow import Affine, time_grid
from openmm_flowpert.noise import Noise


class _GatedExpansion(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.5 * torch.sigmoid(4.0 * y[:, :1]) * y


def _broad_well():
    """4 particles in a harmonic well of width 1.5 nm at 300 K: broader than the flow, so the chain
    is drawn to both halves of the latent space."""
    import openmm

    system = openmm.System()
    well = openmm.CustomExternalForce("0.5 * k * (x^2 + y^2 + z^2)")
    well.addGlobalParameter("k", 2.494 / 1.5 ** 2)
    for i in range(4):
        system.addParticle(1.0)
        well.addParticle(i, [])
    system.addForce(well)
    return system


def _half_invertible_flow(tmp_path):
    flow = fp.PerturbedFlow.build(_GatedExpansion(12), time_grid(1, "uniform"), scheme="euler", n_atoms=4,
                                  transform=Affine(torch.zeros(12, dtype=torch.float64),
                                                   torch.ones(1, dtype=torch.float64)), temperature=300.0)
    flow.module.cnf.inverse_memory = 0          # plain fixed-point iteration: diverges where the gate is open
    flow.save(tmp_path / "gated.pt")
    return flow


def test_flow_inverse_fails_on_part_of_space(tmp_path):
    flow = _half_invertible_flow(tmp_path)
    p = flow.propose(400, Noise(seed=0), estimator="fp++")
    ok = torch.isfinite(flow.inverse(p.x)).all(1)
    z0 = flow.latent(p.w)[:, 0]
    assert 0.2 < float(ok.double().mean()) < 0.8          # a real part of space is outside
    assert bool(ok[z0 < -1.0].all()) and not bool(ok[z0 > 1.0].any())


def _run_move(system, flow, proposal, domain_check, n_calls=40):
    # fast inverse steps in the proposals' estimator (a user setting): their Newton solves cannot fail,
    # so only the domain test keeps the chain out of the region the refresh cannot invert
    # (domain_check=False: the old behaviour, accepting without asking whether the refresh could weigh it)
    move = fp.FlowPerturbationMove(flow, n_proposals=8, proposal=proposal, seed=3, platform="Reference",
                                   exact_inverse=False, domain_check=domain_check)
    ts = states.ThermodynamicState(system, 300 * unit.kelvin)
    start = flow.sample(64, seed=5).numpy()
    inside = torch.isfinite(flow.inverse(torch.as_tensor(start))).all(1).numpy()
    ss = states.SamplerState(start[np.argmax(inside)] * unit.nanometer)   # a state the move can weigh
    cc = cache.ContextCache(platform=__import__("openmm").Platform.getPlatformByName("Reference"))
    for _ in range(n_calls):
        move.apply(ts, ss, cc)
    return move.statistics


def test_moves_never_enter_states_they_cannot_leave(tmp_path):
    """With the domain test (the default) the move-only chain never needs a refresh that fails and
    refuses some accepted-looking proposals; with it disabled (the old code) the chain walks into
    the region where the inverse fails and is stuck there (every later refresh fails)."""
    flow, system = _half_invertible_flow(tmp_path), _broad_well()
    for proposal in ("independent", "latent"):
        good = _run_move(system, flow, proposal, True)
        assert good["n_refresh_failed"] == 0 and good["n_outside_domain"] > 0, (proposal, good)
        assert good["n_accepted"] > 0, (proposal, good)
        bad = _run_move(system, flow, proposal, False)
        assert bad["n_refresh_failed"] > 0, (proposal, bad)


class _Fold(torch.nn.Module):
    """An Euler step y -> y (1 - 1.6 sigmoid(4 y0)) folds space: a point with x0 < 0 has one preimage
    with y0 < 0 and another with y0 > 0 (where the factor is about -0.6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -1.6 * torch.sigmoid(4.0 * y[:, :1]) * y


def test_a_step_that_is_not_one_to_one_puts_the_other_preimage_outside_the_domain(tmp_path):
    """Edge case 2: where a step is not one-to-one, q(x) is a sum over preimages and the refresh
    can find a different latent point from the one that made the proposal. The domain test asks
    the refresh's own inverse: proposals whose inverse lands on another preimage are refused, so
    every state the chain holds is weighed on the branch the refresh will find (exact on that
    branch's density, docs/algorithm.md section 4.8)."""
    flow = fp.PerturbedFlow.build(_Fold(12), time_grid(1, "uniform"), scheme="euler", n_atoms=4,
                                  transform=Affine(torch.zeros(12, dtype=torch.float64),
                                                   torch.ones(1, dtype=torch.float64)), temperature=300.0)
    flow.save(tmp_path / "fold.pt")
    move = fp.FlowPerturbationMove(flow, seed=0)
    p = flow.propose(400, Noise(seed=2), estimator="fp++")
    z, back = flow.latent(p.w), flow.inverse(p.x)
    found = torch.isfinite(back).all(1)
    other = found & ((back - z).abs().amax(1) > 1e-3)          # converged to the other preimage
    assert int(other.sum()) > 10
    assert torch.allclose(flow.module.sample(back[other]), p.x.reshape(400, -1)[other], atol=1e-10)
    inside = move._in_domain(p.x, p.w, flow.prior_scale)
    assert not bool(inside[other].any())
    assert bool(inside[found & ~other].all())
