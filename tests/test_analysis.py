"""Basin populations from a chain and from recycled (Rao-Blackwellized) flow-move candidates."""
import numpy as np

from openmm_flowpert.analysis import phi_populations


def test_recycled_populations_weigh_each_point_by_its_draw_probability():
    rng = np.random.default_rng(0)
    n, k = 400, 5
    phi = rng.uniform(-np.pi, np.pi, size=(n, k))
    p = rng.dirichlet(np.ones(k), size=n)
    pops = phi_populations(phi, probabilities=p)
    basin = ((phi > 0) & (phi < 2.5)).astype(float)
    assert np.isclose(pops["0<phi<2.5"][0], (p * basin).sum(1).mean())
    assert np.isclose(pops["phi<0"][0], (p * (phi < 0)).sum(1).mean())
    # not the unweighted mean over all points (which a forgotten probability would give)
    assert abs(pops["0<phi<2.5"][0] - basin.mean()) > 1e-3
    m, se, g = pops["0<phi<2.5"]
    assert se > 0 and g > 0


def test_recycled_populations_of_one_point_per_iteration_are_the_chain_estimate():
    """With the current state as the only candidate (probability 1), recycling is the chain itself:
    the same mean, SE and statistical inefficiency."""
    rng = np.random.default_rng(1)
    phi = np.cumsum(rng.normal(0, 0.5, size=600)) % (2 * np.pi) - np.pi  # correlated series
    chain = phi_populations(phi)
    recycled = phi_populations(phi[:, None], probabilities=np.ones((600, 1)))
    for key in chain:
        assert np.allclose(chain[key], recycled[key], rtol=1e-9), (key, chain[key], recycled[key])
