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
