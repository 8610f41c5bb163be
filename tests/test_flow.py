"""The discrete flow map, its exact inverse and the exact log-determinant."""
import pytest
import torch
from torch.autograd.functional import jacobian

from openmm_flowpert.estimators.math import log_prior
from openmm_flowpert.flow import CNF, VelocityMLP, time_grid

from conftest import make_module


@pytest.mark.parametrize("n_particles,dim", [(0, 7), (4, 12)])
def test_round_trip_exact_inverse(n_particles, dim):
    m = torch.jit.script(make_module(dim, n_particles, n_steps=10))
    z = m.cnf.project(torch.randn(32, dim, dtype=torch.float64))
    x = m.sample(z)
    assert (m.inverse(x, True) - z).abs().max() < 1e-10
    # the fast reverse-step inverse is only approximate: the test would notice if it were used
    assert (m.inverse(x, False) - z).abs().max() > 1e-9


def test_mean_free_flow_stays_mean_free():
    m = torch.jit.script(make_module(12, 4))
    z = m.cnf.project(torch.randn(8, 12, dtype=torch.float64))
    y = m.cnf(z)
    assert y.view(8, 4, 3).mean(1).abs().max() < 1e-12


def test_non_converging_inverse_gives_nan_rows():
    vel = VelocityMLP(3, 8, 1).double()
    cnf = torch.jit.script(CNF(vel, time_grid(2), inverse_max_iter=1, inverse_tol=1e-30))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.isnan(cnf.inverse(x, True)).all()


class _Linear(torch.nn.Module):
    """v(t, y) = c y: an Euler step is y (1 + h c), injective unless h c = -1."""

    def __init__(self, dim: int, c: float):
        super().__init__()
        self.dim = dim
        self.c = c

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.c * y


@pytest.mark.parametrize("memory", [0, 5])
def test_anderson_inverse_converges_where_plain_iteration_diverges(memory):
    """h c = -1.5: the step x = -0.5 y is invertible, but the plain fixed point y <- x + 1.5 y
    diverges. Anderson mixing solves it (exactly, for a linear map); plain iteration gives NaN."""
    cnf = torch.jit.script(CNF(_Linear(4, -1.5), time_grid(1, "uniform"), scheme="euler",
                               inverse_memory=memory))
    x = torch.randn(6, 4, dtype=torch.float64)
    z = cnf.inverse(x, True)
    if memory == 0:
        assert torch.isnan(z).all()
    else:
        assert (z - (-2.0 * x)).abs().max() < 1e-12
        assert (cnf(z) - x).abs().max() < 1e-12


def test_anderson_inverse_needs_fewer_velocity_passes_than_plain():
    """A stiff random field (plain iteration contracts slowly), same tolerance: the answer agrees
    to round-off with fewer velocity passes."""
    torch.manual_seed(3)
    counts = {}
    zs = {}
    for memory in (0, 5):
        vel = VelocityMLP(6, 32, 2).double()
        vel.load_state_dict(_scaled_state(0.7))
        counting = _Counting(vel)
        cnf = CNF(counting, time_grid(3), inverse_memory=memory)
        x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        zs[memory] = cnf.inverse(x, True)
        counts[memory] = counting.calls
        assert not torch.isnan(zs[memory]).any()
        assert (cnf(zs[memory]) - x).abs().max() < 1e-11
    assert (zs[0] - zs[5]).abs().max() < 1e-11
    assert counts[5] < 0.7 * counts[0], counts  # measured: 152 vs 304 passes


def _scaled_state(gain: float) -> dict:
    """A fixed random VelocityMLP with its output layer scaled by ``gain`` (stiffness)."""
    vel = VelocityMLP(6, 32, 2).double()
    g = torch.Generator().manual_seed(7)
    sd = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3 if v.is_floating_point() and k != "freqs"
          else v for k, v in vel.state_dict().items()}
    sd["out.weight"] = sd["out.weight"] * gain
    return sd


class _Counting(torch.nn.Module):
    def __init__(self, vel):
        super().__init__()
        self.vel = vel
        self.dim = vel.dim
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.vel(t, y)


@pytest.mark.parametrize("n_particles,dim", [(0, 5), (3, 9)])
def test_jacobian_estimator_is_exact_log_det(n_particles, dim):
    mod = make_module(dim, n_particles)
    m = torch.jit.script(mod)
    z = m.cnf.project(torch.randn(3, dim, dtype=torch.float64))
    _, log_q = m.log_q(z, torch.zeros(3, 0, dim, dtype=torch.float64), "jacobian", True, 1.3)
    Q = mod._basis(z)
    for i in range(3):
        J = jacobian(lambda v: mod.sample(v.unsqueeze(0)).squeeze(0), z[i])
        logdet = torch.linalg.slogdet(Q.T @ J @ Q)[1]
        expected = log_prior(z[i:i + 1], 1.3, m.d)[0] - logdet
        assert abs(float(log_q[i] - expected)) < 1e-9


@pytest.mark.parametrize("estimator", ["fp", "fp++"])
@pytest.mark.parametrize("n_particles,dim", [(0, 6), (3, 9)])
def test_perturbation_equals_inverse_jacobian_direction(estimator, n_particles, dim):
    """Per direction, the central difference through the exact inverse gives |J^-1 u| to ~1e-9."""
    mod = make_module(dim, n_particles, n_steps=4)
    m = torch.jit.script(mod)
    z = m.cnf.project(torch.randn(1, dim, dtype=torch.float64))
    P = m.n_probe_sets(estimator, 1)
    g = m.cnf.project(torch.randn(P, dim, dtype=torch.float64)).unsqueeze(0)
    _, log_q = m.log_q(z, g, estimator, True, 1.0)
    Q = mod._basis(z)
    u = g[0] / g[0].norm(dim=-1, keepdim=True)
    y, total = z[0], 0.0
    steps = [lambda v, k=k: mod.cnf.step(k, v.unsqueeze(0)).squeeze(0) for k in range(m.n_steps)]
    maps = [lambda v: mod.cnf(v.unsqueeze(0)).squeeze(0)] if estimator == "fp" else steps
    for j, f in enumerate(maps):
        J = Q.T @ jacobian(f, y) @ Q
        total += float(torch.log(torch.linalg.solve(J, Q.T @ u[j]).norm()))
        y = f(y)
    _, lt = mod.transform(y.unsqueeze(0))
    expected = log_prior(z, 1.0, m.d)[0] + m.d * total - lt[0]
    assert abs(float(log_q[0] - expected)) < 1e-6


def test_a_nan_row_does_not_hold_up_the_inverse_of_the_others():
    """A non-finite input row comes back NaN at once; the other rows still converge, and the solve
    stops when they do (not at the iteration cap)."""
    vel = VelocityMLP(6, 32, 2).double()
    vel.load_state_dict(_scaled_state(0.7))
    counting = _Counting(vel)
    cnf = CNF(counting, time_grid(3), inverse_max_iter=1000)
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    clean = cnf.inverse(x, True)
    calls_clean = counting.calls
    x[3, 2] = float("nan")
    counting.calls = 0
    z = cnf.inverse(x, True)
    assert torch.isnan(z[3]).all() and not torch.isnan(z[torch.arange(8) != 3]).any()
    assert (z[torch.arange(8) != 3] - clean[torch.arange(8) != 3]).abs().max() < 1e-11
    assert counting.calls < 2 * calls_clean, (counting.calls, calls_clean)


def test_inverse_at_its_iteration_cap_returns_only_checked_points():
    """Issue 14, edge case 3: when the iteration cap is reached, the point returned must have had
    its residual checked. A diverging plain iteration (Euler, h c = -1.5) started from a guess whose
    residual is 0.8e3 x tol returns an iterate with residual 1.2e3 x tol: that row must be NaN (the
    old code returned it unchecked); a guess 10x closer passes the 1e3 x tol bound and is returned."""
    tol = 1e-10
    cnf = torch.jit.script(CNF(_Linear(3, -1.5), time_grid(1, "uniform"), scheme="euler", inverse_memory=0,
                               inverse_max_iter=1, inverse_tol=tol))
    x = torch.tensor([[0.3, -0.2, 0.1], [0.3, -0.2, 0.1]], dtype=torch.float64)
    scale = 1.0 + x.abs().amax(1, keepdim=True)
    d = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64) * scale * 2 * tol * torch.tensor([[800.0], [80.0]])
    y = cnf.inverse_step(0, x, True, -2.0 * x + d)       # exact preimage -2x, perturbed by d
    assert torch.isnan(y[0]).all()
    assert torch.isfinite(y[1]).all()
    residual = (cnf.step(0, y[1:]) - x[1:]).abs().amax() / scale[1]
    assert residual <= 1e3 * tol
