"""The scripts in examples/ run end to end at smoke size, as a user would run them (a subprocess in
an empty folder), print their key numbers and write their files. Numbers at these sizes are
meaningless; only their presence and consistency are checked."""
import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BANNERS = ("JAX NOT FOUND", "Warning on use of the timeseries module", "Traceback")


def run_example(name, cwd, *args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{name} {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    for banner in BANNERS:
        assert banner not in out.stdout + out.stderr, banner
    return out.stdout


def number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return m.groups()


def test_hybrid_md_own_pdb(tmp_path):
    out = run_example("hybrid_md_own_pdb.py", tmp_path, "--smoke", "--out", "run")
    assert (tmp_path / "run" / "alanine-dipeptide.pdb").stat().st_size > 0
    assert (tmp_path / "run" / "flow.pt").stat().st_size > 0
    assert "22 atoms" in out
    assert "internal-cdf coordinates, d = 60" in out
    acc, n_acc, n_prop = number(r"flow-move acceptance: ([\d.]+) \((\d+) / (\d+)\)", out)
    assert int(n_prop) == 3 * 4 and 0 <= int(n_acc) <= int(n_prop)       # 3 iterations x 4 proposals
    assert float(acc) == pytest.approx(int(n_acc) / int(n_prop), abs=1e-4)
    assert "n_nonfinite=" in out and "n_refresh_failed=0" in out
    number(r"mean reduced energy: (-?[\d.]+) \+- ([\d.]+) kT", out)
    number(r"population phi<0: ([\d.]+) \+- ([\d.]+) %", out)


def test_replica_exchange_storage_and_resume(tmp_path):
    first = run_example("replica_exchange_flow_moves.py", tmp_path, "--smoke", "--iterations", "2")
    storage = tmp_path / "rex.nc"
    assert storage.stat().st_size > 0
    assert "new run: 2 replicas" in first
    assert number(r"\niterations: (\d+)", first) == ("2",)
    proposed_first = sum(int(p) for _, p in re.findall(r"flow-move acceptance [\d.]+ \((\d+) / (\d+)\)", first))
    assert proposed_first == 2 * 2 * 2                       # 2 iterations x 2 replicas x 2 proposals

    second = run_example("replica_exchange_flow_moves.py", tmp_path, "--smoke", "--iterations", "3")
    assert "resumed from rex.nc at iteration 2" in second
    assert "ran to iteration 3" in second and number(r"\niterations: (\d+)", second) == ("3",)
    stats = re.findall(r"([\d.]+) K  flow-move acceptance [\d.]+ \((\d+) / (\d+)\)", second)
    assert [t for t, _, _ in stats] == ["300.0", "330.0"]
    assert sum(int(p) for _, _, p in stats) == 3 * 2 * 2     # move statistics persisted across the resume
    number(r"swap acceptance 300.0 K <-> 330.0 K: ([\d.]+)", second)
    number(r"population phi<0 ([\d.]+) \+- ([\d.]+) %", second)


def test_smc_gmm(tmp_path):
    out = run_example("smc_gmm.py", tmp_path, "--smoke", "--flow-out", "flow.pt", "--checkpoint", "smc.pt")
    assert (tmp_path / "flow.pt").stat().st_size > 0 and (tmp_path / "smc.pt").stat().st_size > 0
    frac, se, exact = (float(v) for v in number(r"fraction x0<0: ([\d.]+) \+- ([\d.]+) \(exact ([\d.]+)\)", out))
    assert 0.0 <= frac <= 1.0 and se >= 0.0
    assert exact == pytest.approx(0.25, abs=1e-3)
    log_z, = number(r"log Z: (-?[\d.]+) \(exact 0\)", out)
    assert abs(float(log_z)) < 5.0
    number(r"final ESS: ([\d.]+) of the walkers", out)
