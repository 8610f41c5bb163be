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

import openmm_flowpert.noise as noise
from openmm_flowpert.noise import Noise, _fallback, project_mean_free

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
    # unprojected: r is the norm of the Gaussian draw of the same key (Noise.chi uses it)
    u0, r0 = _native.directions(300, 7, 0, 3, 0, 9)
    assert torch.allclose(r0, _native.gaussian(300, 7, 0, 3, 0, 9).norm(dim=1), rtol=1e-15, atol=0)


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
    zp = _fallback.gaussian(rows, 3 * n, 0, 1, 0, 0)
    k = torch.arange(rows) % (3 * n + 1)

    def draw():
        return [_native.gaussian(rows, 3 * n, n, 3, 4, 5), *_native.directions(rows, 3 * n, n, 3, 4, 5),
                _native.uniform(rows * 100 + 1, 3, 4, 5), _native.partial_redraw(zp, k, 3, 4, 5)]

    torch.set_num_threads(1)
    one = draw()
    torch.set_num_threads(2)
    two = draw()
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_native
def test_ops_silent_under_autograd():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = torch.ops.flowpert.partial_redraw(x, torch.full((4,), 2), 0, 0, 0)
        g = torch.ops.flowpert.gaussian(4, 6, 2, 0, 0, 0)
    assert not z.requires_grad and not g.requires_grad


class _Scripted(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.ops.flowpert.gaussian(x.shape[0], x.shape[1], 0, 42, 0, 3)
        k = torch.full([x.shape[0]], 2, dtype=torch.long)
        return torch.ops.flowpert.partial_redraw(x + g, k, 42, 0, 4)


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
    """E = sum(x * c) with c = partial_redraw(x, k=0), a copy of x that carries no gradient:
    E = |x|^2 but F = -x (not -2x)."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        x = positions.to(torch.float64).reshape(1, -1)
        c = torch.ops.flowpert.partial_redraw(x, torch.zeros([1], dtype=torch.long), 0, 0, 0)
        return (x * c).sum()


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
    assert torch.allclose(torch.from_numpy(forces).double(), -x, atol=1e-4)  # the op adds no gradient


def _notice_check(res, fragment):
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"
    lines = [ln for ln in res.stderr.splitlines() if "using the torch fallback" in ln]
    assert len(lines) == 1 and fragment in lines[0], res.stderr


_FALLBACK_USE = """
    import warnings
    import torch
    import openmm_flowpert.noise as noise
    nz = noise.Noise(seed=3)
    g = nz.gaussian(4, 9, n_particles=3)
    assert g.view(4, 3, 3).mean(1).abs().max() < 1e-12
    r = nz.chi(6, 5)
    assert r.shape == (6,) and bool((r > 0).all())
    w, z = nz.partial_redraw(torch.zeros(4, 9), 2, n_particles=3)
    assert int((w != 0).sum()) == 8 and z.shape == (4, 9)
    nz.uniform(5)
    assert noise.kernel_path() == "torch" and noise.kernel_path("cpu") == "torch"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        noise.check_backend("native", "flow file 'x.pt'")
        noise.check_backend("torch", "flow file 'y.pt'")
    assert len(rec) == 1 and "make install" in str(rec[0].message), [str(m.message) for m in rec]
    print(noise.backend())
    """


def test_fallback_forced_by_environment():
    _notice_check(_run_python(_FALLBACK_USE, FLOWPERT_NATIVE="0"), "FLOWPERT_NATIVE=0")


def test_works_and_says_so_once_when_library_missing(tmp_path):
    res = _run_python(_FALLBACK_USE, FLOWPERT_OPS_LIBRARY=str(tmp_path / "libflowpert_ops.so"))
    _notice_check(res, "not built")


# -- Noise: devices, chi, backend checks --------------------------------------------------------

def test_noise_cpu_device_is_the_default():
    a, b, c = Noise(5, stream=2), Noise(5, stream=2, device="cpu"), Noise(5, stream=2, device=torch.device("cpu"))
    for nz in (a, b, c):
        assert nz.device == torch.device("cpu")
    draws = [(nz.gaussian(7, 12, n_particles=4, sets=3), nz.uniform(9), nz.chi(5, 8, device="cpu"),
              nz.partial_redraw(torch.zeros(3, 6), 2)[0], nz.gaussian(2, 3, device=None)) for nz in (a, b, c)]
    for other in draws[1:]:
        for x, y in zip(draws[0], other):
            assert x.device.type == "cpu" and torch.equal(x, y)
    assert a.state() == b.state() == {"seed": 5, "stream": 2, "offset": 5}


def test_noise_state_resumes_the_sequence():
    a = Noise(11, stream=3)
    a.gaussian(4, 6)
    a.uniform(2)
    state = a.state()
    b, c = Noise(**state), Noise(**state, device="cpu")
    for nz in (b, c):
        assert repr(nz) == f"Noise(seed=11, stream=3, offset={state['offset']})"
    want = a.gaussian(3, 6, n_particles=2)
    assert torch.equal(b.gaussian(3, 6, n_particles=2), want) and torch.equal(c.gaussian(3, 6, n_particles=2), want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_noise_cuda_device_without_gpu_raises():
    with pytest.raises(ValueError, match="no CUDA device"):
        Noise(0, device="cuda")


def test_chi_distribution():
    d = 27
    r = Noise(8).chi(20000, d)
    assert r.dtype == torch.float64 and r.shape == (20000,)
    assert stats.kstest(r.numpy(), "chi", args=(d,)).pvalue > 1e-3


@needs_native
def test_chi_is_the_directions_norm(threads):
    # a fixed summation order: the same bits for any thread count (and on the GPU, see below)
    torch.set_num_threads(1)
    one = Noise(4, stream=1, offset=7).chi(4096, 33)
    torch.set_num_threads(2)
    two = Noise(4, stream=1, offset=7).chi(4096, 33)
    assert torch.equal(one, two)
    assert torch.equal(one, _native.directions(4096, 33, 0, 4, 1, 7)[1])
    g = _native.gaussian(4096, 33, 0, 4, 1, 7)
    assert torch.allclose(one, g.norm(dim=1), rtol=1e-15, atol=0)


def test_kernel_path_and_backend():
    assert noise.backend() in ("native", "torch")
    assert noise.kernel_path() == noise.kernel_path("cpu") == ("native-cpu" if noise.backend() == "native" else "torch")
    if torch.cuda.is_available():
        assert noise.kernel_path("cuda") in ("native-cuda", "native-cpu+copy", "torch+copy")


def test_check_backend_warns_only_on_a_mismatch(monkeypatch):
    from openmm_flowpert.noise import _dispatch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noise.check_backend(None, "flow file 'old.pt'")  # not recorded: silent
        noise.check_backend(noise.backend(), "flow file 'same.pt'")
    monkeypatch.setattr(_dispatch, "_impl", _fallback)
    monkeypatch.setattr(_dispatch, "_reason", "native noise ops not built (missing)")
    with pytest.warns(noise.NoiseBackendWarning) as rec:
        noise.check_backend("native", "checkpoint 'run.ckpt'")
    msg = str(rec[0].message)
    assert len(rec) == 1 and "\n" not in msg
    for part in ("checkpoint 'run.ckpt'", "'native' noise backend", "uses 'torch'", "will differ", "make install",
                 "pip install --no-build-isolation -e .", "not built (missing)"):
        assert part in msg, msg
    assert noise.BACKEND_KEY == "noise_backend"


@needs_native
def test_cuda_kernel_failure_falls_back_to_cpu_copy(monkeypatch, caplog):
    """A CUDA kernel that fails (no image for the GPU, an old driver) is replaced by the CPU kernel and
    a copy, once and with a notice; other errors propagate. Exercised here with the 'meta' device."""
    monkeypatch.setattr(_native, "cuda_error", None)
    monkeypatch.setattr(_native, "cuda_kernels", lambda device: _native.cuda_error is None)

    def broken():
        raise RuntimeError("flowpert CUDA: cudaLibraryLoadData(...): no kernel image is available")

    cpu = _native.gaussian(3, 4, 0, 1, 2, 3)
    with caplog.at_level("WARNING", logger="openmm_flowpert"):
        out = _native._on_device(broken, lambda: cpu, torch.device("meta"))
    assert out.device.type == "meta" and out.shape == cpu.shape
    assert "no kernel image" in _native.cuda_error and "drawing on the CPU" in caplog.text
    calls = []
    _native._on_device(lambda: calls.append(1), lambda: cpu, torch.device("meta"))
    assert not calls  # not tried again
    def other():
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(_native, "cuda_error", None)
    with pytest.raises(RuntimeError, match="out of memory"):
        _native._on_device(other, lambda: cpu, torch.device("meta"))
    assert _native.cuda_error is None


def _cpu_and_cuda_draws(device):
    """The same calls of a CPU and a device Noise: (cpu results, device results)."""
    out = []
    for dev in ("cpu", device):
        nz = Noise(21, stream=5, offset=3, device=dev)
        w = torch.randn(300, 51, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dev)
        k = (torch.arange(300) % 52).to(dev)
        out.append([nz.gaussian(257, 99), nz.gaussian(64, 99, n_particles=33, sets=3), nz.uniform(1001),
                    nz.chi(513, 41), nz.partial_redraw(w, k)[0], nz.partial_redraw(w, 3)[0],
                    nz.gaussian(5, 6, device="cpu")])
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_noise_on_cuda_matches_cpu():
    cpu, dev = _cpu_and_cuda_draws("cuda")
    for i, (a, b) in enumerate(zip(cpu, dev)):
        assert a.device.type == "cpu" and b.device.type == ("cpu" if i == len(cpu) - 1 else "cuda")
        assert torch.equal(a, b.cpu()), i


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    if not _native.has_cuda():
        pytest.skip("library built without CUDA kernels")
    op, dev = torch.ops.flowpert, torch.device("cuda")
    assert torch.equal(op.gaussian(257, 99, 33, 1, 2, 3, dev).cpu(), op.gaussian(257, 99, 33, 1, 2, 3))
    for args in [(64, 30, 10, 1, 2, 3), (513, 41, 0, 1, 2, 3)]:
        u, r = op.directions(*args, dev)
        uc, rc = op.directions(*args)
        assert torch.equal(u.cpu(), uc) and torch.equal(r.cpu(), rc)
    assert torch.equal(op.uniform(1001, 1, 2, 3, dev).cpu(), op.uniform(1001, 1, 2, 3))
    w, k = torch.randn(300, 50, dtype=torch.float64), torch.arange(300) % 51
    assert torch.equal(op.partial_redraw(w.to(dev), k.to(dev), 4, 5, 6).cpu(), op.partial_redraw(w, k, 4, 5, 6))
    assert noise.kernel_path("cuda") == "native-cuda"
