"""Replica exchange with FlowPerturbationMove under MPI (mpiexec -n 2, mpi4py + mpich wheels):
completes, every rank loads the flow and the native ops, and the state-0 population of the left
well agrees with the 1-rank run and with the exact value (0.25) within 4 standard errors (the
statistical-inefficiency SE of a 120-sample binary series is itself uncertain by ~20 %)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "rex_gmm.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
N_ITER = 120


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out.stdout[-2000:]
    return json.loads(lines[0])


@pytest.mark.slow   # ~70 s on 2 cores: in `make test-slow`, to keep the default run under 15 minutes
@pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec (mpich wheel) not installed in this environment")
def test_two_ranks_agree_with_one_rank_and_exact(gmm_system_flow, tmp_path):
    """Measured z over seed pairs (one rank s, two ranks s + 1), s = 1-5 (the test uses s = 1; ~40 s a pair):
      one rank vs exact:  -0.89 +0.62 -0.19 +0.19 -0.55
      two ranks vs exact: +0.44 -1.18 -2.19 +0.21 -0.44
      one vs two ranks:   -0.91 +1.21 +1.37 +0.00 -0.10
    (statistical inefficiency g 1.0-2.6; 4 SE because that SE is itself uncertain by ~20 %.)
    """
    flow = gmm_system_flow.path
    one = _run([sys.executable, str(SCRIPT), flow, str(tmp_path / "one.nc"), str(N_ITER), "1"], tmp_path)
    two = _run([str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPT), flow, str(tmp_path / "two.nc"),
                str(N_ITER), "2"], tmp_path)
    assert one["ranks"] == 1 and two["ranks"] == 2
    for res in (one, two):
        assert res["n"] == N_ITER
        assert abs(res["left"] - res["exact"]) < 4 * res["se"] + 1e-9, res
        assert sum(s["n_proposed"] for s in res["stats"]) > 0
    assert abs(one["left"] - two["left"]) < 4 * math.hypot(one["se"], two["se"]) + 1e-9, (one, two)
