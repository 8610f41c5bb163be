"""CLN025 (chignolin mutant): the built system, its observables, and the whole pipeline of
``flowpert chignolin`` at smoke scale (every output file written)."""
import json
import os

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

import openmm_flowpert as fp  # noqa: F401  (torch before openmm)
from openmm_flowpert.analysis import ca_distances, rmsd_to, select_ca_pair, weighted_mean_and_se
from openmm_flowpert.systems import cln025


@pytest.fixture(scope="module")
def cln():
    return cln025("implicit")


def _energy(system, x):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x * unit.nanometer)
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), ctx


def test_cln025_system(cln):
    """166 atoms, no constraints, the native OBC2 force, finite energy after minimization, and an
    energy that does not change under translation."""
    assert cln.n_atoms == 166
    assert cln.system.getNumConstraints() == 0
    names = [type(f).__name__ for f in cln.system.getForces()]
    assert "GBSAOBCForce" in names and "CMMotionRemover" not in names
    e0, ctx = _energy(cln.system, cln.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 500)
    st = ctx.getState(getEnergy=True, getPositions=True)
    e1 = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert np.isfinite(e1) and e1 < e0
    x = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    e_shift, _ = _energy(cln.system, x + np.array([1.3, -0.7, 2.1]))
    assert abs(e_shift - e1) < 1e-6 * abs(e1) + 1e-6


def test_native_gb_equals_obc2_xml(cln):
    """The native GBSAOBCForce route is the same energy function as implicit/obc2.xml's CustomGBForce
    (within float rounding), on the crystal structure and on distorted ones."""
    custom = cln025("implicit", gb="custom")
    assert np.array_equal(custom.positions, cln.positions)  # the build is deterministic
    rng = np.random.default_rng(0)
    for x in [cln.positions] + [cln.positions + 0.01 * rng.normal(size=cln.positions.shape) for _ in range(3)]:
        a, _ = _energy(cln.system, x)
        b, _ = _energy(custom.system, x)
        assert abs(a - b) < 1e-6 * abs(b) + 1e-4, (a, b)
    # the vacuum system differs (the GB term is real), so the comparison above can fail
    vac, _ = _energy(cln025("vacuum").system, cln.positions)
    assert abs(vac - b) > 100.0


def test_observables(cln):
    x = cln.positions[None]
    ca = {a.residue.index: a.index for a in cln.topology.atoms() if a.name == "CA"}
    d = ca_distances(x, cln.topology, (1, 8))
    assert d.shape == (1, 1)
    assert d[0, 0] == pytest.approx(np.linalg.norm(x[0, ca[1]] - x[0, ca[8]]), abs=1e-6)
    with pytest.raises(ValueError, match="C-alpha"):
        ca_distances(x, cln.topology, (1, 42))
    # RMSD is invariant to rigid motion and sees a distortion
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a proper rotation
    moved = x[0] @ q.T + 0.5
    assert rmsd_to(moved[None], x[0], cln.topology)[0] < 1e-3  # mdtraj works in float32
    bent = x[0].copy()
    bent[ca[9]] += 0.3
    assert rmsd_to(bent[None], x[0], cln.topology)[0] > 0.05


def test_select_ca_pair_finds_the_separating_pair(cln):
    """Ensembles that differ only by moving residue 9's atoms away from residue 0's: the pair
    selector must return (0, 9)."""
    rng = np.random.default_rng(2)
    base = cln.positions
    res9 = [a.index for a in cln.topology.atoms() if a.residue.index == 9]
    folded = base + 0.01 * rng.normal(size=(40,) + base.shape)
    unfolded = base + 0.01 * rng.normal(size=(40,) + base.shape)
    com0 = base[[a.index for a in cln.topology.atoms() if a.residue.index == 0]].mean(0)
    direction = base[res9].mean(0) - com0
    unfolded[:, res9] += 0.6 * direction / np.linalg.norm(direction)
    pair, score, table = select_ca_pair(folded, unfolded, cln.topology)
    assert pair == (0, 9) and score > table[1][2]
    assert all(j - i >= 3 for i, j, *_ in table)


def test_weighted_mean_and_se():
    rng = np.random.default_rng(3)
    v = rng.normal(size=1000)
    m, se = weighted_mean_and_se(v, np.ones(1000))
    assert m == pytest.approx(v.mean())
    assert se == pytest.approx(v.std() / np.sqrt(1000), rel=1e-9)
    m, se = weighted_mean_and_se([0.0, 1.0], [1.0, 3.0])
    assert m == pytest.approx(0.75) and se == pytest.approx(np.sqrt(0.25 ** 2 * 0.75 ** 2 + 0.75 ** 2 * 0.25 ** 2))
    # a fraction of all-ones stays 1 (these weights sum the ones to 1 + 2.2e-16 without the clip)
    w = np.random.default_rng(4).exponential(size=16)
    assert weighted_mean_and_se(np.ones(16), w) == (1.0, 0.0)


def test_mixed_precision_needs_cuda():
    x = torch.randn(64, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="cuda"):
        fp.train_flow(x, remove_com=False, epochs=1, mixed_precision=True, progress=False)


EXPECTED = {
    "system": ["minimized.pdb", "minimized.dcd", "system.json"],
    "data": ["trajectory.dcd", "trajectory.pdb", "energies.csv", "summary.json", "timing.json", "replica_exchange.nc",
             "energies.png"],
    "flows": ["internal.pt", "cartesian.pt"],
    "smc": ["walkers.npz", "walkers.dcd", "walkers.pdb", "summary.json", "traces.png"],
    "rex": ["trajectory.dcd", "energies.csv", "summary.json", "replica_exchange.nc", "energies.png", "acceptance.png"],
    "report": ["report.json", "energies.png", "folded_fraction.png", "rmsd.png", "ca_distance.png"],
}


def test_pipeline_smoke(tmp_path):
    """``flowpert chignolin`` at smoke scale: every stage runs on the CPU and writes every file; the
    report compares all three runs; the flows have the issue's dimensions; re-running a finished
    stage keeps its files (resume, no retraining)."""
    from openmm_flowpert.cli import main

    out = tmp_path / "chig"
    assert main(["chignolin", "--out", str(out), "--scale", "smoke"]) == 0
    for folder, files in EXPECTED.items():
        for f in files:
            assert (out / folder / f).is_file() and (out / folder / f).stat().st_size > 0, f"{folder}/{f}"
    assert not list(out.rglob("flowpert-tmp-*"))  # no half-written files left behind
    system = json.loads((out / "system" / "system.json").read_text())
    assert system["n_atoms"] == 166 and system["n_constraints"] == 0
    assert np.isfinite(system["energy_minimized_kJ_per_mol"])
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["runs"]) == {"replica exchange (MD)", "hybrid MD + FP replica exchange",
                                   "flow-perturbation SMC"}
    assert set(report["flows"]) == {"internal", "cartesian"}
    assert report["flows"]["internal"]["d"] == 492 and report["flows"]["cartesian"]["d"] == 495
    for row in report["runs"].values():
        assert 0.0 <= row["folded_fraction"][0] <= 1.0 and row["folded_fraction"][1] >= 0.0
    internal = fp.PerturbedFlow.load(str(out / "flows" / "internal.pt"))
    cartesian = fp.PerturbedFlow.load(str(out / "flows" / "cartesian.pt"))
    assert internal.dim == 3 * 166 - 6 and internal.metadata["coordinates"] == "internal"
    assert cartesian.dim == 3 * 166 and cartesian.remove_com  # d = 495 in the mean-free subspace
    smc = json.loads((out / "smc" / "summary.json").read_text())
    assert smc["n_walkers"] == 16 and smc["n_annealing_steps"] == 5
    mtime = os.path.getmtime(out / "flows" / "internal.pt")
    assert main(["chignolin", "train", "--out", str(out)]) == 0
    assert os.path.getmtime(out / "flows" / "internal.pt") == mtime


def test_backbone_dihedrals_pair_phi_and_psi_of_the_same_residue(cln):
    """An uncapped peptide has phi from residue 2 and psi up to residue N-1: column j of both must
    be the same residue (checked against dihedrals of explicitly chosen atoms)."""
    import mdtraj as md

    from openmm_flowpert.analysis import backbone_dihedrals

    phi, psi = backbone_dihedrals(cln.positions[None], cln.topology)
    assert phi.shape == psi.shape == (1, 8)  # residues 2..9 of 10 have both
    top = md.Topology.from_openmm(cln.topology)
    t = md.Trajectory(cln.positions[None].astype(np.float32), top)
    for j, res in enumerate(range(1, 9)):
        atom = {(a.residue.index, a.name): a.index for a in top.atoms}
        quad_phi = [atom[(res - 1, "C")], atom[(res, "N")], atom[(res, "CA")], atom[(res, "C")]]
        quad_psi = [atom[(res, "N")], atom[(res, "CA")], atom[(res, "C")], atom[(res + 1, "N")]]
        ref = md.compute_dihedrals(t, [quad_phi, quad_psi])[0]
        assert abs(phi[0, j] - ref[0]) < 1e-5 and abs(psi[0, j] - ref[1]) < 1e-5


def test_cli_errors_are_one_line_and_mpi_runs_only_replica_exchange(tmp_path, capsys, monkeypatch):
    from openmm_flowpert.cli import chignolin, main

    assert main(["chignolin", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "unknown stage" in capsys.readouterr().err

    class TwoRanks:
        size, rank = 2, 0

    monkeypatch.setattr(chignolin, "_mpi_comm", lambda: TwoRanks())
    assert main(["chignolin", "train", "--out", str(tmp_path / "x")]) == 2
    assert "under mpiexec run only the replica-exchange stages (data rex)" in capsys.readouterr().err
