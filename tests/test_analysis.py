"""Basin populations from a chain and from recycled (Rao-Blackwellized) flow-move candidates; dihedral
regions; the tail of importance weights."""
import numpy as np

import math

import pytest

from openmm_flowpert.analysis import DihedralRegion, backbone_dihedrals, gpd_fit, pareto_khat, phi_populations


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


@pytest.mark.parametrize("xi", [0.2, 0.5, 0.9])
def test_gpd_fit_recovers_the_shape_of_exact_samples(xi):
    """20,000 exact generalized-Pareto draws (inverse CDF, sigma = 2): the fitted shape is within
    4 SE of xi, SE = (1 + xi) / sqrt(n) (the maximum-likelihood asymptotics). Measured z over seeds
    0-4: xi = 0.2: -0.59, -0.17, 0.23, -0.64, -0.57; 0.5: -0.74, 0.07, 0.49, -0.50, -0.43; 0.9: -0.82,
    0.25, 0.71, -0.42, -0.23."""
    u = np.random.default_rng(1).random(20_000)
    y = 2.0 / xi * ((1.0 - u) ** -xi - 1.0)
    k, sigma = gpd_fit(y)
    se = (1 + xi) / math.sqrt(y.size)
    assert abs(k - xi) < 4 * se, (k, xi, se)
    assert abs(sigma - 2.0) < 0.1


def test_pareto_khat_reads_the_tail_of_importance_weights():
    """Weights w = 1 + Pareto(alpha) have k = 1 / alpha; from 100,000 of them the diagnostic is within
    4 SE, SE = (1 + k) / sqrt(M), M = 3 sqrt(n) the tail size (measured z over seeds 0-4: k = 0.8:
    0.79, 0.21, -0.71, 0.54, 0.14; 0.5: 0.49, 0.32, -0.68, 0.75, 0.14; 0.25: 0.14, 0.44, -0.61, 0.94,
    0.16). Power: it tells k = 0.8 (no finite variance) from k = 0.25 by more than 4 combined SE, and
    light-tailed weights (log w normal, sd 0.5) read below 0.3. Non-finite log-weights are dropped;
    too few are refused."""
    rng = np.random.default_rng(2)
    m = int(3 * math.sqrt(100_000))
    k = {}
    for alpha in (1.25, 2.0, 4.0):
        k[alpha] = pareto_khat(np.log(1.0 + rng.pareto(alpha, 100_000)))
        assert abs(k[alpha] - 1 / alpha) < 4 * (1 + 1 / alpha) / math.sqrt(m), (alpha, k[alpha])
    assert k[1.25] - k[4.0] > 4 * math.hypot(1.8, 1.25) / math.sqrt(m)
    lw = rng.normal(0.0, 0.5, 100_000)
    assert pareto_khat(lw) < 0.3
    assert pareto_khat(np.append(lw, [-np.inf, np.nan])) == pareto_khat(lw)
    with pytest.raises(ValueError, match="at least 25"):
        pareto_khat(np.zeros(10))


def test_dihedral_region_by_name_and_by_atoms_agrees_with_mdtraj():
    """phi:LOW:HIGH and the same dihedral by its four atoms select the frames mdtraj puts in the range;
    LOW > HIGH selects the complement (the range through +-pi)."""
    import mdtraj as md

    from openmm_flowpert.systems import get_system

    ala = get_system("alanine-dipeptide")
    x = ala.positions[None] + np.random.default_rng(0).normal(0, 0.03, (50, ala.n_atoms, 3))
    traj = md.Trajectory(x.astype(np.float32), md.Topology.from_openmm(ala.topology))
    atoms, phi = md.compute_phi(traj)
    phi = phi[:, 0].astype(np.float64)
    np.testing.assert_array_equal(backbone_dihedrals(x, ala.topology)[0][:, 0], phi)
    lo, hi = np.quantile(phi, [0.2, 0.7])
    inside = ((phi > lo) & (phi < hi)).astype(float)
    assert 0.4 < inside.mean() < 0.6
    np.testing.assert_array_equal(DihedralRegion.parse(f"phi:{lo}:{hi}").fraction(x, ala.topology), inside)
    by_atoms = DihedralRegion.parse("-".join(str(i) for i in atoms[0]) + f":{lo}:{hi}")
    np.testing.assert_array_equal(by_atoms.fraction(x, ala.topology), inside)
    np.testing.assert_array_equal(DihedralRegion("phi", hi, lo).fraction(x, ala.topology), 1 - inside)
    psi = DihedralRegion.parse("psi:-3.1416:3.1416").fraction(x, ala.topology)
    assert psi.shape == (50,) and psi.min() == 1.0


@pytest.mark.parametrize("text, message", [
    ("phi:0", "ANGLE:LOW:HIGH"), ("phi:a:1", "ANGLE:LOW:HIGH"), ("phi:0:150", "degrees"),
    ("phi:1:1", "empty"), ("omega:0:1", "phi, psi or four"), ("1-2-3:0:1", "four"), ("1-1-2-3:0:1", "different"),
])
def test_dihedral_region_refuses_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        DihedralRegion.parse(text)


def test_dihedral_region_refuses_atoms_out_of_range():
    from openmm_flowpert.systems import get_system

    ala = get_system("alanine-dipeptide")
    with pytest.raises(ValueError, match="out of range for 22 atoms"):
        DihedralRegion.parse("4-6-8-22:0:1").fraction(ala.positions[None], ala.topology)
