"""Internal-coordinate (Z-matrix) bijection: round trips, exact log-det, TorchScript."""
import math
import os

import openmm_flowpert  # noqa: F401  (first: before openmm / openmmtools)

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian
from openmm import app, unit
from openmmtools import testsystems

from openmm_flowpert.flow.internal import InternalCoordinates, build_zmatrix

DT = torch.float64


def mean_free(x, n):
    w = x.reshape(x.shape[0], n, 3)
    return (w - w.mean(1, keepdim=True)).reshape(x.shape[0], 3 * n)


def wrap(a):
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def y_diff(y1, y2):
    """Largest difference of two y, torsions (and nothing else) compared modulo 2 pi."""
    d = y1 - y2
    d[:, 8::3] = wrap(d[:, 8::3])
    return d.abs().max().item()


@pytest.fixture(scope="module")
def ala():
    sys = testsystems.AlanineDipeptideVacuum(constraints=None)
    n = sys.topology.getNumAtoms()
    ic = InternalCoordinates(build_zmatrix(sys.topology), n)
    x0 = torch.tensor(sys.positions.value_in_unit(unit.nanometer), dtype=DT).reshape(1, 3 * n)
    return ic, x0, n


def random_rotations(B, gen):
    q = torch.linalg.qr(torch.randn(B, 3, 3, generator=gen, dtype=DT))[0]
    return q * torch.sign(torch.linalg.det(q))[:, None, None]


def perturbed(x0, n, B, scale, gen):
    x = x0.reshape(1, n, 3) + scale * torch.randn(B, n, 3, generator=gen, dtype=DT)
    return mean_free((x @ random_rotations(B, gen)).reshape(B, 3 * n), n)


def test_zmatrix_structure(ala):
    ic, _, n = ala
    z = ic.zmatrix.numpy()
    assert z.shape == (n, 4) and sorted(z[:, 0]) == list(range(n))
    placed = set(z[:3, 0])
    for row in z[3:]:
        assert set(row[1:]) <= placed and len(set(row)) == 4
        placed.add(row[0])


def test_round_trip_x_y_x(ala):
    ic, x0, n = ala
    gen = torch.Generator().manual_seed(0)
    x = perturbed(x0, n, 64, 0.01, gen)
    y, ld = ic.inverse(x)
    x2, ld2 = ic(y)
    assert y.shape == (64, 3 * n - 3)
    assert (x2 - x).abs().max() < 1e-10
    assert (ld - ld2).abs().max() < 1e-12


def test_round_trip_torsions_near_pi(ala):
    """Configurations with torsions at -pi + 1e-9 and pi - 1e-9 survive x -> y -> x."""
    ic, x0, n = ala
    y, _ = ic.inverse(x0.expand(4, -1).clone())
    y[:2, 8::3] = math.pi - 1e-9
    y[2:, 8::3] = -math.pi + 1e-9
    y[1::2, 8::6] = torch.pi  # exactly +pi for half of them
    x, _ = ic(y)
    y2, _ = ic.inverse(x)
    x2, _ = ic(y2)
    assert (x2 - x).abs().max() < 1e-10
    assert y_diff(y, y2) < 1e-9


def test_round_trip_y_x_y(ala):
    ic, x0, n = ala
    gen = torch.Generator().manual_seed(1)
    B = 64
    y, _ = ic.inverse(x0.expand(B, -1).clone())
    y = y + 0.02 * torch.randn(y.shape, generator=gen, dtype=DT)
    y[:, 8::3] = (2 * torch.rand(B, n - 3, generator=gen, dtype=DT) - 1) * math.pi  # all torsions
    omega = torch.randn(B, 3, generator=gen, dtype=DT)
    radius = math.pi * torch.rand(B, 1, generator=gen, dtype=DT) ** (1 / 3)
    y[:, 3:6] = 0.999 * radius * omega / omega.norm(dim=1, keepdim=True)  # |omega| < pi
    y[0, 3:6] = 1e-10  # near the identity
    x, ld = ic(y)
    assert mean_free(x, n).sub(x).abs().max() < 1e-14
    y2, ld2 = ic.inverse(x)
    assert y_diff(y, y2) < 1e-10
    assert (ld - ld2).abs().max() < 1e-9


def test_log_det_matches_autograd(ala):
    ic, x0, n = ala
    gen = torch.Generator().manual_seed(2)
    ones = torch.full((n, n), 1.0 / n, dtype=DT)
    P = torch.eye(3 * n, dtype=DT) - torch.kron(ones, torch.eye(3, dtype=DT))
    w, V = torch.linalg.eigh(P)
    Q = V[:, w > 0.5]  # orthonormal basis of the mean-free subspace, (3N, 3N - 3)
    assert Q.shape == (3 * n, 3 * n - 3)
    y, ld = ic.inverse(perturbed(x0, n, 4, 0.02, gen))
    for b in range(y.shape[0]):
        J = jacobian(lambda v: ic(v[None])[0][0], y[b])
        sign, ref = torch.linalg.slogdet(Q.T @ J)
        assert sign != 0 and abs(ref.item() - ld[b].item()) < 1e-8


def test_torchscript(ala):
    ic, x0, n = ala
    sc = torch.jit.script(ic)
    x = perturbed(x0, n, 8, 0.01, torch.Generator().manual_seed(3))
    y, ld = ic.inverse(x)
    ys, lds = sc.inverse(x)
    xs, ldf = sc(ys)
    assert torch.equal(ys, y) and torch.equal(lds, ld)
    assert torch.equal(xs, ic(y)[0]) and torch.equal(ldf, ld)


def test_bad_zmatrix_rejected(ala):
    ic, _, n = ala
    z = ic.zmatrix.numpy().copy()
    z[5, 1] = z[10, 0]  # references an atom placed later
    with pytest.raises(ValueError):
        InternalCoordinates(z, n)


def test_cln025_heavy_atoms_round_trip():
    """Chignolin (5awl, heavy atoms; ring of Tyr/Trp side chains closes without a placement bond)."""
    path = os.path.join(os.path.dirname(openmm_flowpert.__file__), "data", "5awl.pdb")  # shipped with the package
    pdb = app.PDBFile(path)
    top = pdb.topology
    if top.getNumBonds() == 0:
        top.createStandardBonds()
    assert all(a.element.symbol != "H" for a in top.atoms())
    n = top.getNumAtoms()
    ic = InternalCoordinates(build_zmatrix(top), n)
    x0 = torch.tensor(np.asarray(pdb.positions.value_in_unit(unit.nanometer)), dtype=DT)
    x0 = x0.reshape(1, 3 * n)
    x = perturbed(x0, n, 16, 0.01, torch.Generator().manual_seed(4))
    y, ld = ic.inverse(x)
    x2, ld2 = ic(y)
    assert torch.isfinite(ld).all()
    assert (x2 - x).abs().max() < 1e-10


# -- normalized internal coordinates (the transform of molecular flows) ----------------------------
from openmm_flowpert.flow import NormalizedInternal, frame_rotation, haar_rotations  # noqa: E402


@pytest.fixture(scope="module")
def ala_norm(ala):
    ic, x0, n = ala
    data = perturbed(x0, n, 400, 0.01, torch.Generator().manual_seed(7))
    return NormalizedInternal.fit(ic, data), data


def test_sibling_torsions_for_branches(ala):
    """Methyl hydrogens after the first take their torsion relative to a sibling (nearly rigid)."""
    ic, x0, n = ala
    z = ic.zmatrix.numpy()
    y, _ = ic.inverse(x0)
    n_sib = 0
    for r, row in enumerate(z[3:]):
        i, j, k, l_ = row
        if l_ in z[:, 0][: list(z[:, 0]).index(i)] and any((z[:, 0] == l_) & (z[:, 1] == j)):
            n_sib += 1
            t = abs(y[0, 8 + 3 * r].item())
            assert 1.5 < t < math.pi + 1e-9  # about 120 degrees (tetrahedral) or 180 (planar branch)
    assert n_sib >= 6  # 3 methyl groups x 2 hydrogens at least


def test_normalized_round_trip_and_cut(ala, ala_norm):
    """x -> y -> x to 1e-10 (float64), including torsions close to their cut and close to +-pi."""
    ic, x0, n = ala
    tr, data = ala_norm
    y, ld = tr.inverse(data[:32])
    assert torch.isfinite(y).all() and (y.abs().mean() < 3)
    # Push torsions next to the cut (v large) and to +-pi, then round trip from y.
    y2 = y.clone()
    ic_y, _ = ic.inverse(data[:32])
    raw_t = tr.cut + math.pi * (1 + torch.tanh(tr.mean[5::3] + tr.std[5::3] * y2[:, 5::3]))
    assert wrap(raw_t - ic_y[:, 8::3]).abs().max() < 1e-10
    v_edge = torch.tensor([8.0, -8.0], dtype=DT)  # t within 1e-6 rad of the cut on either side
    y2[:2, 5] = (v_edge - tr.mean[5]) / tr.std[5]
    v_pi = torch.atanh(torch.remainder(math.pi - 1e-9 - tr.cut[1], 2 * math.pi) / math.pi - 1)
    y2[2, 8] = (v_pi - tr.mean[8]) / tr.std[8]
    x, ldf = tr(y2)
    y3, ldi = tr.inverse(x)
    assert (y3 - y2).abs().max() < 1e-6 and (ldf - ldi).abs().max() < 1e-9
    x4, _ = tr(y3)
    assert (x4 - x).abs().max() < 1e-10
    # and from x: the canonical-frame image of data, rotated back, is the data (mean-free)
    xc, _ = tr(y)
    R = frame_rotation(data[:32].reshape(32, n, 3), (ic.a0, ic.a1, ic.a2, ic.a2_on_a0))
    back = torch.einsum("bij,bnj->bni", R, xc.reshape(32, n, 3)).reshape(32, -1)
    assert (back - mean_free(data[:32], n)).abs().max() < 1e-10


def test_normalized_log_det_matches_autograd(ala, ala_norm):
    """logdet = log|det Q^T d x / d(y, omega)| - log r(omega) + log(8 pi^2): the Haar-rotated density."""
    ic, x0, n = ala
    tr, data = ala_norm
    ones = torch.full((n, n), 1.0 / n, dtype=DT)
    P = torch.eye(3 * n, dtype=DT) - torch.kron(ones, torch.eye(3, dtype=DT))
    w, V = torch.linalg.eigh(P)
    Q = V[:, w > 0.5]
    y, ld = tr.inverse(data[:3])
    omega = torch.tensor([[0.3, -1.1, 0.7], [2.0, 0.5, -1.0], [0.0, 0.0, 0.1]], dtype=DT)

    def full(v):  # (y, omega) -> x, through the normalized transform and a rotation by omega
        raw = tr.mean + tr.std * v[:-3]
        t = tr.cut + math.pi * (1 + torch.tanh(raw[5::3]))
        icy = torch.cat([raw[:3], v[-3:], torch.stack([raw[3::3], raw[4::3], t], -1).reshape(-1)])
        return ic(icy[None])[0][0]

    for b in range(3):
        J = jacobian(full, torch.cat([y[b], omega[b]]))
        sign, ref = torch.linalg.slogdet(Q.T @ J)
        th = omega[b].norm()
        log_r = math.log(2 * (1 - math.cos(th)) / th ** 2)
        assert sign != 0 and abs(ref.item() - log_r + math.log(8 * math.pi ** 2) - ld[b].item()) < 1e-8


def test_haar_rotations_are_uniform():
    """E[R] = 0 and E[R_ij^2] = 1/3 for Haar rotations (checked to 4 SE), det = +1.

    Largest |z| of the 9 entries over seeds 0-4 (the test uses 0): E[R] 1.39 2.08 1.42 2.05 2.47;
    E[R_ij^2] 1.47 1.57 1.65 1.78 1.22 (SE from SD 0.3; exactly sqrt(4/45) = 0.298). 4 SE on the
    largest of 9 entries has the false-alarm rate (6e-4) of 3.45 SE on a single one.
    """
    R = haar_rotations(torch.randn(20000, 4, generator=torch.Generator().manual_seed(0), dtype=DT))
    assert (torch.linalg.det(R) - 1).abs().max() < 1e-12
    se = (1 / 3 / 20000) ** 0.5
    assert R.mean(0).abs().max() < 4 * se
    assert (R.pow(2).mean(0) - 1 / 3).abs().max() < 4 * 0.3 / 20000 ** 0.5


def test_cln025_with_hydrogens_round_trip():
    """Full CLN025 (hydrogens added by pdbfixer at pH 7): x -> y -> x to 1e-10."""
    pdbfixer = pytest.importorskip("pdbfixer")
    path = os.path.join(os.path.dirname(openmm_flowpert.__file__), "data", "5awl.pdb")
    fixer = pdbfixer.PDBFixer(filename=path)
    fixer.findMissingResidues()
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    top = fixer.topology
    n = top.getNumAtoms()
    assert n > 130
    ic = InternalCoordinates(build_zmatrix(top), n)
    x0 = torch.tensor(np.asarray(fixer.positions.value_in_unit(unit.nanometer)), dtype=DT).reshape(1, 3 * n)
    x = perturbed(x0, n, 8, 0.005, torch.Generator().manual_seed(5))
    tr = NormalizedInternal.fit(ic, perturbed(x0, n, 64, 0.005, torch.Generator().manual_seed(6)))
    y, ld = tr.inverse(x)
    x2, ld2 = tr(y)
    assert torch.isfinite(ld).all() and (ld - ld2).abs().max() < 1e-8
    R = frame_rotation(x.reshape(8, n, 3), (ic.a0, ic.a1, ic.a2, ic.a2_on_a0))
    back = torch.einsum("bij,bnj->bni", R, x2.reshape(8, n, 3)).reshape(8, -1)
    assert (back - mean_free(x, n)).abs().max() < 1e-10


# -- torsions through their fitted marginals ("internal-cdf") ---------------------------------------
from openmm_flowpert.flow import MarginalInternal  # noqa: E402
from openmm_flowpert.flow.molecular import torsion_marginals  # noqa: E402


def _rotor_angles(n, seed):
    """A three-fold rotor: peaks of width 0.15 rad at -pi/3, pi/3 and pi (the last across +-pi)."""
    g = torch.Generator().manual_seed(seed)
    centre = (torch.randint(0, 3, (n,), generator=g) * 2 - 1).to(DT) * math.pi / 3
    return wrap(centre + 0.15 * torch.randn(n, generator=g, dtype=DT))


@pytest.fixture(scope="module")
def ala_marginal(ala):
    """Fitted on the perturbed alanine frames, with the first free torsion replaced by a rotor."""
    ic, x0, n = ala
    data = perturbed(x0, n, 400, 0.01, torch.Generator().manual_seed(7))
    tr = MarginalInternal.fit(ic, data)
    t = _rotor_angles(20000, 1).unsqueeze(1)
    mass = tr.mass.clone()
    mass[0] = torsion_marginals(t, tr.cut[:1])[0]
    return MarginalInternal(ic, tr.mean, tr.std, tr.cut, mass), data


def test_marginal_map_makes_a_rotor_standard_normal(ala_marginal):
    """v = Phi^-1(F(t)) of fresh rotor angles is standard normal: mean, variance and the fraction
    below 0 within 4 SE (n = 20,000; SE 0.007, 0.010, 0.0035), and its Kolmogorov-Smirnov distance
    from N(0, 1) is small, while the tanh map's v (standardized) is far from normal."""
    tr, _ = ala_marginal
    t = _rotor_angles(20000, 2).unsqueeze(1).expand(-1, tr.cut.numel())
    v, _ = tr._to_line(t)
    v = v[:, 0]
    se = 1 / math.sqrt(20000)
    assert abs(float(v.mean())) < 4 * se and abs(float(v.var()) - 1) < 4 * math.sqrt(2) * se
    assert abs(float((v < 0).double().mean()) - 0.5) < 4 * 0.5 * se
    s = torch.remainder(t[:, 0] - tr.cut[0], 2 * math.pi) / math.pi - 1
    v_tanh = torch.atanh(s)

    def ks(a):  # Kolmogorov-Smirnov distance of standardized a from N(0, 1)
        a, _ = torch.sort((a - a.mean()) / a.std())
        ecdf = torch.arange(1, a.numel() + 1, dtype=DT) / a.numel()
        return float((ecdf - torch.special.ndtr(a)).abs().max())

    assert ks(v) < 0.02 and ks(v_tanh) > 0.08, (ks(v), ks(v_tanh))


def test_marginal_round_trip_at_the_cut_and_at_pi(ala, ala_marginal):
    """x -> y -> x to 1e-10 on data; y -> x -> y to 1e-8 with torsions at +-pi (both sides) and
    within |v| = 6 of the cut (the deep tails, 1e-9 of the mass), log-dets equal to 1e-8."""
    ic, x0, n = ala
    tr, data = ala_marginal
    y, ld = tr.inverse(data[:32])
    x, ldf = tr(y)
    assert (tr.inverse(x)[0] - y).abs().max() < 1e-10 and (ld - ldf).abs().max() < 1e-9
    y2 = y[:6].clone()
    for row, target in enumerate([math.pi - 1e-9, -math.pi + 1e-9]):
        v, _ = tr._to_line(torch.full((1, tr.cut.numel()), target, dtype=DT))
        y2[row, 5::3] = (v[0] - tr.mean[5::3]) / tr.std[5::3]
    for row, v_edge in zip(range(2, 6), [6.0, -6.0, 3.0, -3.0]):
        y2[row, 5::3] = (v_edge - tr.mean[5::3]) / tr.std[5::3]
    x2, ld2 = tr(y2)
    y3, ld3 = tr.inverse(x2)
    assert (y3 - y2).abs().max() < 1e-8 and (ld2 - ld3).abs().max() < 1e-8
    t, _ = ic.inverse(x2)
    assert wrap(t[:2, 8] - torch.tensor([math.pi - 1e-9, -math.pi + 1e-9], dtype=DT)).abs().max() < 1e-9


def test_marginal_log_det_matches_autograd(ala, ala_marginal):
    """logdet of the torsion map log phi(v) - log f(t) and of the whole transform against autograd
    of the map (y, omega) -> x on the mean-free subspace, as for NormalizedInternal."""
    ic, x0, n = ala
    tr, data = ala_marginal
    y, ld = tr.inverse(data[:3])
    _assert_log_det_matches_autograd(ic, n, tr, y, ld)


def _assert_log_det_matches_autograd(ic, n, tr, y, ld):
    """The transform's log-det ld (3,) at y (3, 3N - 6) against autograd of the map
    (y, omega) -> x on the mean-free subspace (the Haar factor of omega taken out)."""
    ones = torch.full((n, n), 1.0 / n, dtype=DT)
    P = torch.eye(3 * n, dtype=DT) - torch.kron(ones, torch.eye(3, dtype=DT))
    w, V = torch.linalg.eigh(P)
    Q = V[:, w > 0.5]
    omega = torch.tensor([[0.3, -1.1, 0.7], [2.0, 0.5, -1.0], [0.0, 0.0, 0.1]], dtype=DT)

    def full(v):
        raw = tr.mean + tr.std * v[:-3]
        t, _ = tr._to_angle(raw[5::3][None])
        icy = torch.cat([raw[:3], v[-3:], torch.stack([raw[3::3], raw[4::3], t[0]], -1).reshape(-1)])
        return ic(icy[None])[0][0]

    for b in range(3):
        J = jacobian(full, torch.cat([y[b], omega[b]]))
        sign, ref = torch.linalg.slogdet(Q.T @ J)
        th = omega[b].norm()
        log_r = math.log(2 * (1 - math.cos(th)) / th ** 2)
        assert sign != 0 and abs(ref.item() - log_r + math.log(8 * math.pi ** 2) - ld[b].item()) < 1e-8


def test_marginal_transform_survives_a_flow_file(ala, ala_marginal, tmp_path):
    """Scripted, saved and loaded inside a flow: the same map and log-det bit for bit."""
    import openmm_flowpert as fp
    from openmm_flowpert.flow import VelocityMLP, time_grid

    ic, x0, n = ala
    tr, data = ala_marginal
    torch.manual_seed(0)
    flow = fp.PerturbedFlow.build(VelocityMLP(3 * n - 6, hidden=16, n_layers=1), time_grid(4), tr)
    assert flow.coordinates == "internal-cdf" and flow.metadata["orientation"] == "haar"
    flow.save(str(tmp_path / "f.pt"))
    back = fp.PerturbedFlow.load(str(tmp_path / "f.pt"))
    a, b = flow.propose(8, fp.Noise(1)), back.propose(8, fp.Noise(1))
    assert torch.equal(a.x, b.x) and torch.equal(a.log_q, b.log_q)
    assert torch.equal(back.rescripted().propose(8, fp.Noise(1)).log_q, a.log_q)


# -- torsions kept on the circle ("internal-circle") ------------------------------------------------
from openmm_flowpert.flow import CircularInternal  # noqa: E402


@pytest.fixture(scope="module", params=["all", "mixed"])
def ala_circle(request, ala, ala_marginal):
    """The circle map with the same marginals (the rotor included) as ``ala_marginal``: every
    torsion on the circle, or every other one (the rest on the line, as "internal-cdf")."""
    ic, x0, n = ala
    tr, data = ala_marginal
    on_circle = torch.ones(n - 3, dtype=torch.bool)
    if request.param == "mixed":
        on_circle[1::2] = False
    mean, std = tr.mean.clone(), tr.std.clone()
    tm, ts = mean[5::3].clone(), std[5::3].clone()
    tm[on_circle], ts[on_circle] = 0.0, 1.0
    mean[5::3], std[5::3] = tm, ts
    return CircularInternal(ic, mean, std, tr.cut, tr.mass, on_circle), data


def test_circle_fit_puts_only_rotating_torsions_on_the_circle(ala):
    """fit: a torsion spread over the whole circle goes on it, one confined to an arc stays on the
    line (min_density); "internal-torus" puts both on the circle."""
    from openmm_flowpert.flow import TorusInternal
    from openmm_flowpert.flow.molecular import emptiest_bin_density

    ic, x0, n = ala
    g = torch.Generator().manual_seed(3)
    data = perturbed(x0, n, 3000, 0.01, g)
    t = torch.stack([torch.rand(3000, generator=g, dtype=DT) * 2 * math.pi - math.pi,
                     0.3 * torch.randn(3000, generator=g, dtype=DT)], 1)
    dens = emptiest_bin_density(t)
    assert dens[0] > 0.5 and dens[1] == 0
    assert CircularInternal.fit(ic, data).periodic() == []            # perturbed frames: every torsion confined
    assert TorusInternal.fit(ic, data).periodic() == list(range(5, 3 * n - 6, 3))


def test_circle_map_makes_a_rotor_uniform_on_the_circle(ala_circle):
    """s = 2 pi F(t) - pi of fresh rotor angles is uniform on [-pi, pi): mean and the fractions
    in each quarter within 4 SE (n = 20,000)."""
    tr, _ = ala_circle
    t = _rotor_angles(20000, 2).unsqueeze(1).expand(-1, tr.cut.numel())
    s = tr._to_line(t)[0][:, 0]
    assert bool((s >= -math.pi).all()) and bool((s < math.pi).all())
    se = 1 / math.sqrt(20000)
    assert abs(float(s.mean())) < 4 * se * math.pi / math.sqrt(3)
    for q in range(4):
        lo = -math.pi + q * math.pi / 2
        frac = float(((s >= lo) & (s < lo + math.pi / 2)).double().mean())
        assert abs(frac - 0.25) < 4 * math.sqrt(0.25 * 0.75) * se, (q, frac)


def test_circle_round_trip_on_every_branch_and_at_the_seam(ala, ala_circle):
    """y -> x -> y to 1e-9 (torsions modulo 2 pi) with circle coordinates at -pi, just below pi,
    at the seam t = cut from both sides and on other branches (s + 2 pi k); the same x and
    log-det for s and s + 2 pi k; x -> y -> x to 1e-10 on data, with s in [-pi, pi)."""
    ic, x0, n = ala
    tr, data = ala_circle
    assert tr.periodic() == [5 + 3 * j for j in range(n - 3) if bool(tr.on_circle[j])]
    y, ld = tr.inverse(data[:32])
    assert bool((y[:, 5::3] >= -math.pi).all()) and bool((y[:, 5::3] < math.pi).all())
    x, ldf = tr(y)
    assert (tr.inverse(x)[0] - y).abs().max() < 1e-10 and (ld - ldf).abs().max() < 1e-9
    y2 = y[:6].clone()
    circ = [5 + 3 * j for j in range(n - 3) if bool(tr.on_circle[j])]
    for row, s in enumerate([-math.pi, math.pi - 1e-12, -math.pi + 1e-9, math.pi - 1e-9, 0.0, 3.0]):
        y2[row, circ] = s
    x2, ld2 = tr(y2)
    y3, ld3 = tr.inverse(x2)
    d = y3 - y2
    d[:, circ] = wrap(d[:, circ])
    assert d.abs().max() < 1e-9 and (ld2 - ld3).abs().max() < 1e-8
    shifted = y2.clone()
    shifted[:, circ] += 2 * math.pi * torch.tensor([[3.0], [-1.0], [1.0], [-2.0], [5.0], [-7.0]], dtype=DT)
    x4, ld4 = tr(shifted)
    assert (x4 - x2).abs().max() < 1e-12 and (ld4 - ld2).abs().max() < 1e-12


def test_circle_log_det_matches_autograd(ala, ala_circle):
    """log |dt/ds| = -log 2 pi - log f(t) and the whole transform's log-det against autograd of
    (y, omega) -> x on the mean-free subspace, at data points and at s = -pi."""
    ic, x0, n = ala
    tr, data = ala_circle
    y, _ = tr.inverse(data[:3])
    y[2, tr.periodic()] = -math.pi + 1e-7   # just past the seam, inside the first bin
    _, ld = tr(y)
    _assert_log_det_matches_autograd(ic, n, tr, y, ld)


def test_circle_transform_refuses_rescaled_torsions(ala, ala_circle):
    ic, x0, n = ala
    tr, _ = ala_circle
    std = tr.std.clone()
    std[5] = 2.0
    with pytest.raises(ValueError, match="internal-circle: the mean and std of torsions on the circle must be 0 and 1"):
        CircularInternal(ic, tr.mean, std, tr.cut, tr.mass, torch.ones(n - 3, dtype=torch.bool))


def test_circle_flow_is_a_map_of_the_torus(ala, ala_circle, tmp_path):
    """A flow in front of the circle map: its velocity is 2 pi-periodic in the torsions, so a latent
    shifted by 2 pi k gives the same proposal and log q (every estimator, to the finite-difference
    floor of fp / fp++); the exact inverse
    returns the latent in [-pi, pi); prior, velocity and metadata survive a flow file bit for bit."""
    import openmm_flowpert as fp
    from openmm_flowpert.flow import VelocityMLP, time_grid

    ic, x0, n = ala
    tr, data = ala_circle
    torch.manual_seed(0)
    flow = fp.PerturbedFlow.build(VelocityMLP(3 * n - 6, hidden=16, n_layers=2, periodic=tr.periodic()),
                                  time_grid(4), tr)
    assert flow.coordinates == "internal-circle" and flow.periodic == tr.periodic()
    circ = tr.periodic()
    z = flow.latent(fp.Noise(2).gaussian(4, flow.dim))
    assert bool((z[:, circ].abs() < math.pi).all()) and z[:, circ].std() > 1.0   # uniform, not N(0, 1)
    zs = z.clone()
    k = torch.randint(-3, 4, zs[:, circ].shape, generator=torch.Generator().manual_seed(1))
    zs[:, circ] += 2 * math.pi * k.to(DT)
    for est in ("jacobian", "fp", "fp++"):
        P = flow.n_probe_sets(est)
        eps = fp.Noise(3).gaussian(4, flow.dim, sets=P) if P else torch.zeros(4, 0, flow.dim, dtype=DT)
        xa, la = flow.module.log_q(z, eps, est, True, 1.0)
        xb, lb = flow.module.log_q(zs, eps, est, True, 1.0)
        tol = 1e-9 if est == "jacobian" else 1e-6   # fp, fp++: central differences at |z| ~ 20
        assert (xa - xb).abs().max() < 1e-10 and (la - lb).abs().max() < tol, est
    back = flow.inverse(flow.module.sample(zs).reshape(4, n, 3))
    assert (back - z).abs().max() < 1e-9
    flow.save(str(tmp_path / "c.pt"))
    again = fp.PerturbedFlow.load(str(tmp_path / "c.pt"))
    a, b = flow.propose(8, fp.Noise(1)), again.propose(8, fp.Noise(1))
    assert torch.equal(a.x, b.x) and torch.equal(a.log_q, b.log_q) and again.periodic == flow.periodic
    assert torch.equal(again.rescripted().propose(8, fp.Noise(1)).log_q, a.log_q)
