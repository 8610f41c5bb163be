"""Flow files: TorchScript + metadata, reloadable in a fresh process; clear errors for bad files."""
import json
import os
import subprocess
import sys

import pytest
import torch

import openmm_flowpert as fp
from openmm_flowpert import FlowFileError


def test_save_load_round_trip_in_fresh_process(gmm_flow, tmp_path):
    path = tmp_path / "flow.pt"
    gmm_flow.save(path)
    assert os.listdir(tmp_path) == ["flow.pt"]  # no half-written leftovers
    w = torch.randn(5, gmm_flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(5, gmm_flow.n_steps, gmm_flow.dim, dtype=torch.float64)
    x, lq = gmm_flow.evaluate(w, eps, estimator="fp++")
    torch.save({"w": w, "eps": eps}, tmp_path / "inputs.pt")
    code = f"""
import json, torch, openmm_flowpert as fp
flow = fp.PerturbedFlow.load({str(path)!r})
d = torch.load({str(tmp_path / 'inputs.pt')!r})
x, lq = flow.evaluate(d['w'], d['eps'], estimator='fp++')
print(json.dumps({{'x': x.tolist(), 'lq': lq.tolist(), 'meta': flow.metadata}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(got["x"], dtype=torch.float64), x, atol=1e-12)
    assert torch.allclose(torch.tensor(got["lq"], dtype=torch.float64), lq, atol=1e-9)
    meta = got["meta"]
    assert meta["units"] == "nm" and meta["integrator"] == "rk4" and meta["n_steps"] == gmm_flow.n_steps
    assert meta["d"] == 10 and meta["remove_com"] is False and meta["prior_scale"] == 1.0


def test_missing_file(tmp_path):
    with pytest.raises(FlowFileError, match="does not exist"):
        fp.PerturbedFlow.load(tmp_path / "nope.pt")


def test_truncated_file(gmm_flow, tmp_path):
    path = tmp_path / "flow.pt"
    gmm_flow.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlowFileError, match="truncated or corrupt"):
        fp.PerturbedFlow.load(path)


def test_foreign_torchscript_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(FlowFileError, match="not an openmm-flowpert flow"):
        fp.PerturbedFlow.load(path)


def test_shape_errors(gmm_flow):
    with pytest.raises(ValueError, match="coordinates per sample"):
        gmm_flow.refresh(torch.zeros(3, 7), fp.Noise(0))
    with pytest.raises(ValueError, match="unknown estimator"):
        gmm_flow.propose(3, fp.Noise(0), estimator="exact")


def test_molecular_flow_shapes_and_centre_of_mass():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    samples = base + 0.05 * torch.randn(300, 4, 3, dtype=torch.float64, generator=gen) + 2.0
    flow = fp.train_flow(samples, epochs=2, hidden=16, n_layers=1, n_steps=4, lr=2e-3, ema=0.995, progress=False)
    assert flow.remove_com and flow.d == 9 and flow.n_atoms == 4
    prop = flow.propose(6, fp.Noise(1), estimator="fp++")
    assert prop.x.shape == (6, 4, 3)
    assert prop.x.mean(1).abs().max() < 1e-9
    exact = flow.refresh(prop.x, fp.Noise(2), estimator="jacobian").log_q
    moved = flow.refresh(prop.x + 3.0, fp.Noise(2), estimator="jacobian")  # rigid translation: same q
    assert torch.allclose(moved.log_q, exact, atol=1e-8)
    assert moved.x.mean(1).abs().max() < 1e-9
    with pytest.raises(ValueError, match="trained for 4 atoms"):
        flow.refresh(torch.zeros(2, 5, 3), fp.Noise(0))
