"""The built-in alanine tetrapeptide: what it is (ACE-ALA3-NME, amber14, vacuum, L-alanines, trans
peptide bonds), that it is built the same in every process, and that it parametrizes like the same
structure read from a PDB file."""
import random

import numpy as np
import pytest

from openmm_flowpert.systems import alanine_tetrapeptide, get_system


def _signed_volume(x: np.ndarray, atoms: dict) -> float:
    """(N - CA) x (C - CA) . (CB - CA) in nm^3: positive for an L residue in this convention."""
    ca = x[atoms["CA"]]
    return float(np.dot(np.cross(x[atoms["N"]] - ca, x[atoms["C"]] - ca), x[atoms["CB"]] - ca))


def test_alanine_tetrapeptide_is_ace_ala3_nme_in_l_form():
    s = get_system("alanine-tetrapeptide")
    assert s.n_atoms == 42 and s.system.getNumConstraints() == 0
    assert not s.system.usesPeriodicBoundaryConditions()
    assert [r.name for r in s.topology.residues()] == ["ACE", "ALA", "ALA", "ALA", "NME"]
    assert sum(a.element.symbol == "H" for a in s.topology.atoms()) == 22
    assert s.topology.getNumBonds() == 41   # a tree: the internal coordinates have 3 * 42 - 6 = 120 entries
    res = [{a.name: a.index for a in r.atoms()} for r in s.topology.residues()]
    # chirality: every alanine has the sign of openmmtools' (L-)alanine dipeptide
    ref = get_system("alanine-dipeptide")
    ref_res = [{a.name: a.index for a in r.atoms()} for r in ref.topology.residues()]
    ref_sign = np.sign(_signed_volume(ref.positions, ref_res[1]))
    assert ref_sign != 0
    assert [np.sign(_signed_volume(s.positions, r)) for r in res[1:4]] == [ref_sign] * 3
    # trans peptide bonds (omega = CA-C-N-CA, the caps' methyl carbons included; mdtraj's
    # compute_omega skips the caps, so the quadruplets are listed here)
    import mdtraj as md
    chain = [res[0]["CH3"]] + [r["CA"] for r in res[1:4]] + [res[4]["C"]]
    quads = [[chain[i], res[i]["C"], res[i + 1]["N"], chain[i + 1]] for i in range(4)]
    omega = np.degrees(md.compute_dihedrals(md.Trajectory(s.positions[None], md.Topology.from_openmm(s.topology)),
                                            quads)[0])
    assert np.all(np.abs(np.abs(omega) - 180.0) < 25.0), omega
    # a minimized structure: a low energy and a small force on every atom
    import openmm
    from openmm import unit
    ctx = openmm.Context(s.system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(s.positions)
    st = ctx.getState(getEnergy=True, getForces=True)
    assert st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) < 0.0
    assert np.abs(st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)).max() < 20.0


def test_alanine_tetrapeptide_is_reproducible_and_matches_its_pdb(tmp_path):
    state = random.getstate()
    a = alanine_tetrapeptide()
    assert random.getstate() == state                     # the caller's random stream is untouched
    b = alanine_tetrapeptide()
    assert np.array_equal(a.positions, b.positions)       # same structure in every build / process
    from openmm import app, unit
    from openmm_flowpert.energies import ReducedPotential
    pdb = tmp_path / "tetra.pdb"
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(a.topology, a.positions * unit.nanometer, fh)
    c = get_system(str(pdb), ["amber14-all.xml"])
    x = np.stack([a.positions, c.positions])
    assert np.abs(x[0] - x[1]).max() < 1e-3               # PDB precision: 1e-4 nm
    ua, uc = ReducedPotential(a.system, 300.0)(x), ReducedPotential(c.system, 300.0)(x)
    np.testing.assert_allclose(ua, uc, rtol=0, atol=1e-6)  # same force field on both routes
    with pytest.raises(ValueError, match="vacuum only"):
        alanine_tetrapeptide("implicit")


def test_alanine_tetrapeptide_internal_coordinates_are_exact():
    """The Z-matrix of the 42-atom chain (three branched residues) is a bijection onto 3N - 3 = 123
    coordinates (120 internal + 3 orientation): x -> y -> x to 1e-10 nm and the log-det against
    autograd on the mean-free subspace."""
    import torch
    from torch.autograd.functional import jacobian

    from openmm_flowpert.flow.internal import InternalCoordinates, build_zmatrix

    s = alanine_tetrapeptide()
    n = s.n_atoms
    ic = InternalCoordinates(build_zmatrix(s.topology), n)
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor(s.positions, dtype=torch.float64)[None] + 0.01 * torch.randn(
        8, n, 3, generator=gen, dtype=torch.float64)
    x = (x - x.mean(1, keepdim=True)).reshape(8, 3 * n)
    y, ld = ic.inverse(x)
    assert y.shape == (8, 3 * n - 3)
    x2, ld2 = ic(y)
    assert (x2 - x).abs().max() < 1e-10 and (ld - ld2).abs().max() < 1e-9
    centre = torch.eye(3 * n, dtype=torch.float64) - torch.kron(
        torch.full((n, n), 1.0 / n, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    w, v = torch.linalg.eigh(centre)
    basis = v[:, w > 0.5]     # orthonormal basis of the mean-free subspace, (3N, 3N - 3)
    for b in range(2):
        sign, ref = torch.linalg.slogdet(basis.T @ jacobian(lambda t: ic(t[None])[0][0], y[b]))
        assert sign != 0 and abs(ref.item() - ld[b].item()) < 1e-8
