"""Native noise ops (csrc/, torch.ops.flowpert) against the torch fallback and their own contract.

Native-specific tests skip when libflowpert_ops.so is not built; the fallback-path tests always run.
"""
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch  # before openmm (openmm-torch plugin loading)
from scipy import stats

from openmm_flowpert.noise import _fallback, project_mean_free

try:
    from openmm_flowpert.noise import _native
except OSError:
    _native = None

ROOT = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.skipif(_native is None, reason="native library not built")
IMPLS = [pytest.param(_fallback, id="fallback"), pytest.param(_native, id="native", marks=needs_native)]


def _run_python(code, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@needs_native
def test_philox_known_answers():
    # Random123 kat_vectors for philox4x32-10
    ctr = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    keys = [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0xA4093822, 0x299F31D0)]
    want = [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
    for c, (k0, k1), w in zip(ctr, keys, want):
        assert torch.ops.flowpert._philox(c.view(1, 4), k0, k1)[0].tolist() == w


@pytest.mark.parametrize("impl", IMPLS)
def test_gaussian_moments_and_ks(impl):
    g = impl.gaussian(4000, 25, 0, 11, 3, 7)
    assert g.dtype == torch.float64 and g.shape == (4000, 25)
    x = g.flatten().numpy()
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(x)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-3


@needs_native
def test_native_and_fallback_same_distribution():
    a = _native.gaussian(2000, 30, 10, 5, 0, 1)  # mean-free, d = 27 per row
    b = _fallback.gaussian(2000, 30, 10, 5, 0, 1)
    assert stats.ks_2samp(a.flatten().numpy(), b.flatten().numpy()).pvalue > 1e-3
    na, nb = (x.pow(2).sum(1).numpy() for x in (a, b))  # chi^2 with 27 degrees of freedom
    assert stats.ks_2samp(na, nb).pvalue > 1e-3
    assert stats.kstest(na, "chi2", args=(27,)).pvalue > 1e-3
    ua, ub = _native.uniform(50000, 5, 0, 2), _fallback.uniform(50000, 5, 0, 2)
    assert stats.ks_2samp(ua.numpy(), ub.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_open_interval(impl):
    u = impl.uniform(100001, 1, 2, 3)
    assert u.dtype == torch.float64 and u.shape == (100001,)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3


@needs_native
def test_mean_free_projection_exact():
    n = 17
    g = _native.gaussian(300, 3 * n, n, 9, 1, 4)
    assert g.view(300, n, 3).mean(1).abs().max() < 1e-14
    # it is exactly the projection of the unprojected draw with the same key
    raw = _native.gaussian(300, 3 * n, 0, 9, 1, 4)
    assert torch.allclose(g, project_mean_free(raw, n), rtol=0, atol=1e-14)


@needs_native
def test_directions():
    u, r = _native.directions(500, 12, 4, 3, 0, 8)
    g = _native.gaussian(500, 12, 4, 3, 0, 8)
    assert torch.allclose(u.norm(dim=1), torch.ones(500, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(u * r[:, None], g, atol=1e-13)
    assert u.view(500, 4, 3).mean(1).abs().max() < 1e-14


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_redraw_changes_exactly_k(impl):
    B, D = 64, 40
    w = 100.0 + torch.arange(B * D, dtype=torch.float64).view(B, D)  # far from any N(0,1) draw
    k = torch.tensor([0, 1, 2, D // 2, D - 1, D] * 10 + [3, 0, D, 7])
    out = impl.partial_redraw(w, k, 4, 2, 6)
    changed = out != w
    assert torch.equal(changed.sum(1), k)
    assert torch.equal(out[~changed], w[~changed])  # untouched coordinates are bit-identical
    assert out[changed].abs().max() < 10  # the redrawn ones are fresh standard normals


@needs_native
def test_partial_redraw_selection_uniform_and_values_normal():
    B, D = 20000, 10
    w = torch.full((B, D), 50.0)
    out = _native.partial_redraw(w, torch.full((B,), 3), 1, 0, 0)
    counts = (out != 50.0).sum(0).numpy()  # each coordinate chosen with probability 3/D
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.kstest(out[out != 50.0].numpy(), "norm").pvalue > 1e-3
    # all coordinates redrawn: the values are the Gaussian draws of the same key
    full = _native.partial_redraw(torch.zeros(30, 7), torch.full((30,), 7), 5, 1, 2)
    assert torch.equal(full, _native.gaussian(30, 7, 0, 5, 1, 2))


@needs_native
def test_partial_redraw_accepts_float32_and_rejects_bad_k():
    w = torch.zeros(4, 5, dtype=torch.float32)
    assert _native.partial_redraw(w, torch.tensor([1, 2, 3, 4]), 0, 0, 0).dtype == torch.float64
    with pytest.raises(RuntimeError, match="k must lie"):
        _native.partial_redraw(w, torch.tensor([1, 2, 3, 6]), 0, 0, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_reproducible_and_keyed(impl):
    base = (7, 1, 5)
    a = impl.gaussian(8, 9, 3, *base)
    assert torch.equal(a, impl.gaussian(8, 9, 3, *base))
    for other in [(8, 1, 5), (7, 2, 5), (7, 1, 6)]:  # seed, stream, offset
        assert not torch.equal(a, impl.gaussian(8, 9, 3, *other))
    u = impl.uniform(10, *base)
    assert torch.equal(u, impl.uniform(10, *base)) and not torch.equal(u, impl.uniform(10, 7, 1, 6))
    w, k = torch.zeros(6, 9), torch.full((6,), 4)
    p = impl.partial_redraw(w, k, *base)
    assert torch.equal(p, impl.partial_redraw(w, k, *base))
    assert not torch.equal(p, impl.partial_redraw(w, k, 7, 2, 5))


@needs_native
def test_large_keys_accepted():
    a = _native.gaussian(2, 3, 0, 2**64 - 1, 2**40, 2**33)
    assert torch.isfinite(a).all() and not torch.equal(a, _native.gaussian(2, 3, 0, 2**64 - 1, 2**40, 2**34))


@needs_native
def test_identical_for_one_and_two_threads(threads):
    rows, n = 1024, 111  # above the parallel grain, odd row length
    zp, zm = _fallback.gaussian(rows, 3 * n, 0, 1, 0, 0), _fallback.gaussian(rows, 3 * n, 0, 1, 0, 1)
    k = torch.arange(rows) % (3 * n + 1)

    def draw():
        return [_native.gaussian(rows, 3 * n, n, 3, 4, 5), *_native.directions(rows, 3 * n, n, 3, 4, 5),
                _native.uniform(rows * 100 + 1, 3, 4, 5), _native.partial_redraw(zp, k, 3, 4, 5),
                _native.log_stretch(zp, zm, 0.02)]

    torch.set_num_threads(1)
    one = draw()
    torch.set_num_threads(2)
    two = draw()
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_stretch_matches_torch(dtype):
    zp = torch.randn(300, 57, dtype=dtype, generator=torch.Generator().manual_seed(0))
    zm = zp + 1e-3 * torch.randn(300, 57, dtype=dtype, generator=torch.Generator().manual_seed(1))
    want = torch.log(torch.linalg.vector_norm(zp.double() - zm.double(), dim=1) / 2e-3)
    got = _native.log_stretch(zp, zm, 2e-3)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # non-contiguous inputs
    got_t = _native.log_stretch(zp.t().contiguous().t(), zm, 2e-3)
    assert torch.allclose(got_t, want, rtol=1e-12, atol=1e-12)


@needs_native
def test_public_log_stretch_keeps_gradients():
    from openmm_flowpert.noise import log_stretch

    zp = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    zm = torch.zeros(5, 6, dtype=torch.float64)
    y = log_stretch(zp, zm, 0.5)
    y.sum().backward()
    assert torch.allclose(zp.grad, zp.detach() / zp.detach().pow(2).sum(1, keepdim=True))
    with torch.no_grad():
        assert torch.allclose(log_stretch(zp, zm, 0.5), y.detach(), rtol=1e-13)


@needs_native
def test_ops_silent_under_autograd():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.ops.flowpert.log_stretch(x, x.detach() + 1, 2.0)
        z = torch.ops.flowpert.partial_redraw(x, torch.full((4,), 2), 0, 0, 0)
    assert not y.requires_grad and not z.requires_grad


class _Scripted(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.ops.flowpert.gaussian(x.shape[0], x.shape[1], 0, 42, 0, 3)
        return torch.ops.flowpert.log_stretch(x + g, x - g, 2.0)


@needs_native
def test_torchscript_save_and_reload_in_fresh_process(tmp_path):
    module = torch.jit.script(_Scripted())
    path = tmp_path / "m.pt"
    module.save(str(path))
    x = torch.arange(12, dtype=torch.float64).view(3, 4)
    want = module(x)
    res = _run_python(f"""
        import torch
        torch.ops.load_library({str(_native.LIBRARY)!r})
        m = torch.jit.load({str(path)!r})
        y = m(torch.arange(12, dtype=torch.float64).view(3, 4))
        print(repr(y.tolist()))
        """)
    assert res.returncode == 0, res.stderr
    assert eval(res.stdout.strip()) == want.tolist()  # bit-identical across processes


class _Energy(torch.nn.Module):
    """E = sum(x^2) * s with s = exp(log_stretch(x + 1, x - 1, 2) - log sqrt(3N)) = 1."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        x = positions.to(torch.float64)
        s = torch.ops.flowpert.log_stretch(x.reshape(1, -1) + 1.0, x.reshape(1, -1) - 1.0, 2.0)
        return (x * x).sum() * torch.exp(s[0] - 0.5 * math.log(float(x.numel())))


@needs_native
def test_openmm_torchforce_cpu_platform():
    import openmm
    import openmmtorch

    force = openmmtorch.TorchForce(torch.jit.script(_Energy()))
    system = openmm.System()
    for _ in range(3):
        system.addParticle(1.0)
    system.addForce(force)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    pos = [[0.1, 0.2, 0.3], [-0.4, 0.5, 0.0], [1.0, -1.0, 0.5]]
    ctx.setPositions(pos)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = ctx.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    x = torch.tensor(pos, dtype=torch.float64)
    assert energy == pytest.approx(float((x * x).sum()), rel=1e-5)
    assert torch.allclose(torch.from_numpy(forces).double(), -2 * x, atol=1e-4)  # log_stretch adds no gradient


def _notice_check(res, fragment):
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"
    lines = [ln for ln in res.stderr.splitlines() if "using the torch fallback" in ln]
    assert len(lines) == 1 and fragment in lines[0], res.stderr


_FALLBACK_USE = """
    import torch
    import openmm_flowpert.noise as noise
    nz = noise.Noise(seed=3)
    g = nz.gaussian(4, 9, n_particles=3)
    u, r = nz.directions(4, 9, n_particles=3)
    w, z = nz.partial_redraw(torch.zeros(4, 9), 2, n_particles=3)
    assert torch.allclose(u.norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert int((w != 0).sum()) == 8 and noise.log_stretch(g, g + 1, 2.0).shape == (4,)
    nz.uniform(5)
    print(noise.backend())
    """


def test_fallback_forced_by_environment():
    _notice_check(_run_python(_FALLBACK_USE, FLOWPERT_NATIVE="0"), "FLOWPERT_NATIVE=0")


def test_works_and_says_so_once_when_library_missing(tmp_path):
    res = _run_python(_FALLBACK_USE, FLOWPERT_OPS_LIBRARY=str(tmp_path / "libflowpert_ops.so"))
    _notice_check(res, "not built")


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    if not _native.has_cuda():
        pytest.skip("library built without CUDA kernels")
    op, dev = torch.ops.flowpert, torch.device("cuda")
    assert torch.equal(op.gaussian(257, 99, 33, 1, 2, 3, dev).cpu(), op.gaussian(257, 99, 33, 1, 2, 3))
    u, r = op.directions(64, 30, 10, 1, 2, 3, dev)
    uc, rc = op.directions(64, 30, 10, 1, 2, 3)
    assert torch.allclose(u.cpu(), uc, atol=1e-15) and torch.allclose(r.cpu(), rc, rtol=1e-15)
    assert torch.equal(op.uniform(1001, 1, 2, 3, dev).cpu(), op.uniform(1001, 1, 2, 3))
    w, k = torch.randn(300, 50, dtype=torch.float64), torch.arange(300) % 51
    assert torch.equal(op.partial_redraw(w.to(dev), k.to(dev), 4, 5, 6).cpu(), op.partial_redraw(w, k, 4, 5, 6))
    zm = w + 0.01
    assert torch.allclose(op.log_stretch(w.to(dev), zm.to(dev), 0.1).cpu(), op.log_stretch(w, zm, 0.1), rtol=1e-14)
