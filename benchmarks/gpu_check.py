"""GPU check of every CUDA path of the noise layer, and of a flow on the GPU: a PASS/FAIL table.

    python benchmarks/gpu_check.py [--build] [--archs 90] [--quick]

Where torch sees no CUDA device it prints "no CUDA device" and exits 0. Otherwise it checks

* each CUDA kernel of libflowpert_ops.so (gaussian, mean-free gaussian, directions, uniform,
  partial_redraw; edge sizes, large keys, a side stream) against the CPU kernel: same bits;
* ``Noise(device="cuda")`` (and ``device=`` per call): every draw method returns CUDA tensors equal
  bit for bit to the CPU draws, the offsets advance alike, the path is the CUDA kernels;
* the CPU-draw-and-copy paths (a library without CUDA kernels, the torch fallback, a kernel that
  fails at run time) give the same numbers on the GPU as on the CPU;
* a small mean-free ``PerturbedFlow`` on the GPU (``flow.to("cuda")``): propose / refresh (fp,
  fp++) / evaluate / sample draw the same noise as on the CPU (recorded draw by draw), return CPU
  tensors, and agree with the CPU flow up to floating-point summation order. The "noise device"
  row says where the flow had its noise drawn (cuda once PerturbedFlow passes its device).

Exit status 0 when every check passes (or there is no device), 1 otherwise.

``--build`` first builds the library with the CUDA kernels into build/gpu-check (CMake; the
toolchain of cmake/flowpert_cuda_toolchain.py, cubins for ``--archs``, default: this GPU's) and
reruns itself with FLOWPERT_OPS_LIBRARY pointing there: for a machine whose installed library has no
CUDA kernels or none at all (a bare GPU machine with only torch: the package's __init__ needs
OpenMM, so this script imports the modules it needs without it when OpenMM is missing).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (before openmm, as in the package)


def _import_package() -> str:
    """Import openmm_flowpert; without OpenMM, a bare package object so that the torch-only
    modules (noise, flow, estimators, perturbed_flow) still import."""
    try:
        import openmm_flowpert  # noqa: F401

        return "full package"
    except ImportError as err:
        pkg = types.ModuleType("openmm_flowpert")
        pkg.__path__ = [str(ROOT / "openmm_flowpert")]
        sys.modules["openmm_flowpert"] = pkg
        return f"torch-only modules ({err})"


class Table:
    def __init__(self):
        self.rows = []

    def add(self, name: str, ok, detail: str = "") -> None:
        result = {True: "PASS", False: "FAIL", None: "SKIP"}.get(ok, ok)
        self.rows.append((name, result, detail))
        print(f"  {result:4}  {name}" + (f"  ({detail})" if detail else ""), flush=True)

    def check(self, name: str, fn) -> None:
        """Run fn() -> (ok, detail) or ok; an exception is a FAIL with its message."""
        try:
            out = fn()
        except Exception as err:  # report, keep going
            msg = str(err).strip().splitlines()
            self.add(name, False, f"{type(err).__name__}: {msg[0] if msg else ''}"[:160])
            return
        ok, detail = out if isinstance(out, tuple) else (out, "")
        self.add(name, ok, detail)

    def print(self) -> int:
        w = max(len(r[0]) for r in self.rows)
        print(f"\n{'check':<{w}}  result  detail")
        print(f"{'-' * w}  ------  ------")
        for name, result, detail in self.rows:
            print(f"{name:<{w}}  {result:<6}  {detail}")
        n_fail = sum(r[1] == "FAIL" for r in self.rows)
        n_pass = sum(r[1] == "PASS" for r in self.rows)
        print(f"\n{n_pass} passed, {n_fail} failed, {len(self.rows) - n_pass - n_fail} skipped")
        return 1 if n_fail else 0


def _same(a: torch.Tensor, b: torch.Tensor):
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if torch.equal(a, b):
        return True, f"{a.numel()} values bit-identical"
    diff = (a != b).sum().item()
    return False, f"{diff} of {a.numel()} values differ, max |diff| {float((a - b).abs().max()):.3g}"


def _close(a: torch.Tensor, b: torch.Tensor, tol: float):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    fin = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return False, "non-finite entries differ"
    err = float((a[fin] - b[fin]).abs().max()) if bool(fin.any()) else 0.0
    return err <= tol, f"max |diff| {err:.2e} (tol {tol:g})"


# -- the library's kernels ---------------------------------------------------------------------------
def kernel_checks(t: Table, dev: torch.device) -> None:
    from openmm_flowpert.noise import _native

    op = torch.ops.flowpert
    cases = {
        "gaussian 257x99": lambda: _same(op.gaussian(257, 99, 0, 1, 2, 3, dev), op.gaussian(257, 99, 0, 1, 2, 3)),
        "gaussian mean-free 257x99 (33 particles)":
            lambda: _same(op.gaussian(257, 99, 33, 1, 2, 3, dev), op.gaussian(257, 99, 33, 1, 2, 3)),
        "gaussian 4096x3000 (many blocks)":
            lambda: _same(op.gaussian(4096, 3000, 1000, 7, 0, 1, dev), op.gaussian(4096, 3000, 1000, 7, 0, 1)),
        "gaussian, 64-bit keys": lambda: _same(op.gaussian(9, 31, 0, -1, 2**40, 2**33, dev),
                                              op.gaussian(9, 31, 0, -1, 2**40, 2**33)),
        "gaussian, empty shapes": lambda: (op.gaussian(0, 5, 0, 1, 0, 0, dev).shape == (0, 5)
                                           and op.gaussian(3, 0, 0, 1, 0, 0, dev).shape == (3, 0)),
    }
    for name, fn in cases.items():
        t.check(f"kernel {name}", fn)

    def directions(args):
        u, r = op.directions(*args, dev)
        uc, rc = op.directions(*args)
        ok_u, du = _same(u, uc)
        ok_r, dr = _same(r, rc)
        return ok_u and ok_r, f"u: {du}; r: {dr}"

    t.check("kernel directions 64x30 mean-free (u, r)", lambda: directions((64, 30, 10, 1, 2, 3)))
    t.check("kernel directions 513x41 (chi norms)", lambda: directions((513, 41, 0, 1, 2, 3)))
    t.check("kernel uniform 1001 (odd)", lambda: _same(op.uniform(1001, 1, 2, 3, dev), op.uniform(1001, 1, 2, 3)))
    t.check("kernel uniform in (0, 1)",
            lambda: bool(((lambda u: (u > 0) & (u < 1))(op.uniform(10**6, 5, 0, 0, dev))).all()))

    def redraw(dtype):
        w = torch.randn(300, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
        k = torch.arange(300) % 51  # 0 .. D
        return _same(op.partial_redraw(w.to(dev), k.to(dev), 4, 5, 6), op.partial_redraw(w, k, 4, 5, 6))

    t.check("kernel partial_redraw 300x50, k = 0..D", lambda: redraw(torch.float64))
    t.check("kernel partial_redraw float32 input", lambda: redraw(torch.float32))

    def side_stream():
        s = torch.cuda.Stream(dev)
        with torch.cuda.stream(s):
            g = op.gaussian(2048, 301, 0, 3, 1, 4, dev)
            u = op.uniform(4097, 3, 1, 4, dev)
        s.synchronize()
        ok_g, dg = _same(g, op.gaussian(2048, 301, 0, 3, 1, 4))
        ok_u, du = _same(u, op.uniform(4097, 3, 1, 4))
        return ok_g and ok_u, "launched on torch's current (side) stream"

    t.check("kernels on a side stream", side_stream)
    t.check("no CUDA kernel failure recorded", lambda: (_native.cuda_error is None, _native.cuda_error or ""))


# -- Noise on the device -----------------------------------------------------------------------------
def _draws(nz, dev):
    w = torch.randn(300, 51, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k = torch.arange(300) % 52
    on = (lambda x: x.to(dev)) if dev is not None else (lambda x: x)
    return {
        "gaussian": nz.gaussian(257, 99),
        "gaussian mean-free, sets": nz.gaussian(64, 99, n_particles=33, sets=3),
        "uniform": nz.uniform(1001),
        "chi": nz.chi(513, 41),
        "partial_redraw (tensor k)": nz.partial_redraw(on(w), on(k))[0],
        "partial_redraw (int k)": nz.partial_redraw(on(w), 3)[0],
        "gaussian device='cpu' per call": nz.gaussian(5, 6, device="cpu"),
    }


def noise_checks(t: Table, dev: torch.device) -> None:
    import openmm_flowpert.noise as noise
    from openmm_flowpert.noise import Noise, _dispatch, _fallback

    want = "native-cuda" if noise.backend() == "native" and _has_cuda() else None
    t.check("kernel_path('cuda')", lambda: (noise.kernel_path(dev) == want if want else None,
                                            f"{noise.kernel_path(dev)} (backend {noise.backend()})"))

    def compare(expect_path):
        path = noise.kernel_path(dev)
        cpu, gpu = Noise(21, stream=5, offset=3), Noise(21, stream=5, offset=3, device=dev)
        a, b = _draws(cpu, None), _draws(gpu, dev)
        bad = []
        for name in a:
            want_dev = "cpu" if "device='cpu'" in name else "cuda"
            if b[name].device.type != want_dev:
                bad.append(f"{name} on {b[name].device}")
            elif not torch.equal(a[name], b[name].cpu()):
                bad.append(f"{name} differs")
        if cpu.offset != gpu.offset:
            bad.append(f"offsets {cpu.offset} != {gpu.offset}")
        if expect_path and path != expect_path:
            bad.append(f"path {path}, expected {expect_path}")
        return not bad, "; ".join(bad) if bad else f"{len(a)} draw methods bit-identical, path {path}"

    t.check("Noise(device='cuda') == Noise() draws", lambda: compare(want))

    def per_call():
        a, b = Noise(4), Noise(4)
        x, y = a.gaussian(100, 30, n_particles=10), b.gaussian(100, 30, n_particles=10, device=dev)
        p, q = a.chi(50, 7), b.chi(50, 7, device="cuda")
        return (y.is_cuda and q.is_cuda and torch.equal(x, y.cpu()) and torch.equal(p, q.cpu()),
                "device= per call on a CPU Noise")

    t.check("Noise().gaussian/chi(device='cuda')", per_call)

    def resumed():
        a = Noise(9, device=dev)
        a.gaussian(3, 4)
        b = Noise(**a.state())  # a checkpoint resumed on the CPU
        return torch.equal(a.uniform(77).cpu(), b.uniform(77)), f"state {a.state()} has no device"

    t.check("Noise state resumes on another device", resumed)

    from openmm_flowpert.noise import _native as nat_mod

    if noise.backend() == "native":
        old = nat_mod._HAS_CUDA
        nat_mod._HAS_CUDA = False  # as a CPU-only build
        try:
            t.check("CPU kernels + copy (library without CUDA)", lambda: compare("native-cpu+copy"))
        finally:
            nat_mod._HAS_CUDA = old

        def failing():
            saved = nat_mod.cuda_error
            calls = []

            def broken(*args, **kw):
                calls.append(1)
                raise RuntimeError("flowpert CUDA: simulated failure")

            real = torch.ops.flowpert.gaussian
            try:
                nat_mod._ops = types.SimpleNamespace(**{n: getattr(torch.ops.flowpert, n)
                                                        for n in ("directions", "uniform", "partial_redraw")},
                                                     gaussian=lambda *a: broken() if len(a) == 7 else real(*a))
                g = Noise(1, device=dev).gaussian(10, 12)
                ok = g.is_cuda and torch.equal(g.cpu(), Noise(1).gaussian(10, 12)) and calls == [1]
                ok = ok and nat_mod.cuda_error is not None and noise.kernel_path(dev) == "native-cpu+copy"
                return ok, f"one notice, then {noise.kernel_path(dev)}"
            finally:
                nat_mod._ops = torch.ops.flowpert
                nat_mod.cuda_error = saved

        t.check("a failing CUDA kernel falls back to CPU + copy", failing)
    old_impl = _dispatch._impl
    _dispatch._impl = _fallback  # the torch fallback (FLOWPERT_NATIVE=0)
    try:
        t.check("torch fallback + copy", lambda: compare("torch+copy"))
    finally:
        _dispatch._impl = old_impl


def _has_cuda() -> bool:
    try:
        from openmm_flowpert.noise import _native

        return _native.has_cuda()
    except OSError:
        return False


# -- a flow on the device ----------------------------------------------------------------------------
def _recording_noise():
    from openmm_flowpert.noise import Noise

    class RecordingNoise(Noise):
        """Noise that keeps a CPU copy and the device of every draw."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.log = []

        def _rec(self, name, out):
            first = out[0] if isinstance(out, tuple) else out
            self.log.append((name, first.detach().cpu().clone(), first.device.type))
            return out

        def gaussian(self, *a, **kw):
            return self._rec("gaussian", super().gaussian(*a, **kw))

        def uniform(self, *a, **kw):
            return self._rec("uniform", super().uniform(*a, **kw))

        def chi(self, *a, **kw):
            return self._rec("chi", super().chi(*a, **kw))

        def partial_redraw(self, *a, **kw):
            return self._rec("partial_redraw", super().partial_redraw(*a, **kw))

    return RecordingNoise


def flow_checks(t: Table, dev: torch.device, quick: bool) -> None:
    from openmm_flowpert.flow import VelocityMLP, time_grid
    from openmm_flowpert.perturbed_flow import PerturbedFlow

    RecordingNoise = _recording_noise()
    torch.manual_seed(0)
    n_particles = 6
    velocity = VelocityMLP(3 * n_particles, hidden=32, n_layers=2)
    built = PerturbedFlow.build(velocity, time_grid(4, "uniform"), n_particles=n_particles)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "flow.pt")
        built.save(path)
        cpu = PerturbedFlow.load(path)
        gpu = PerturbedFlow.load(path).to(dev)
    devices = set()

    def same_noise(a, b):
        if [(n, x.shape) for n, x, _ in a.log] != [(n, x.shape) for n, x, _ in b.log]:
            return False, "different draw calls"
        devices.update(d for _, _, d in b.log)
        bad = [n for (n, x, _), (_, y, _) in zip(a.log, b.log) if not torch.equal(x, y)]
        return not bad, f"{len(a.log)} draws" + (f", differ: {bad}" if bad else " bit-identical")

    def on_cpu(*xs):
        return all(x.device.type == "cpu" for x in xs)

    for est in ("fp++", "fp"):
        def propose(est=est):
            na, nb = RecordingNoise(7), RecordingNoise(7)
            pa, pb = cpu.propose(64, na, estimator=est), gpu.propose(64, nb, estimator=est)
            ok_n, dn = same_noise(na, nb)
            ok_w = torch.equal(pa.w, pb.w) and torch.equal(pa.eps, pb.eps)
            ok_x, dx = _close(pa.x, pb.x, 1e-9)
            ok_q, dq = _close(pa.log_q, pb.log_q, 1e-6)
            ok = ok_n and ok_w and ok_x and ok_q and on_cpu(pb.x, pb.log_q, pb.w, pb.eps)
            return ok, f"noise: {dn}; x {dx}; log q {dq}"

        t.check(f"flow.propose ({est}) on cuda vs cpu", propose)

        def refresh(est=est):
            x = cpu.propose(32, RecordingNoise(3), estimator=est).x
            na, nb = RecordingNoise(8), RecordingNoise(8)
            ra, rb = cpu.refresh(x, na, estimator=est), gpu.refresh(x, nb, estimator=est)
            ok_n, dn = same_noise(na, nb)
            ok_w, dw = _close(ra.w, rb.w, 1e-8)
            ok_e, de = _close(ra.eps, rb.eps, 1e-8)
            ok_q, dq = _close(ra.log_q, rb.log_q, 1e-6)
            ok = ok_n and ok_w and ok_e and ok_q and on_cpu(rb.x, rb.log_q, rb.w, rb.eps)
            return ok, f"noise: {dn}; w {dw}; eps {de}; log q {dq}"

        t.check(f"flow.refresh ({est}) on cuda vs cpu", refresh)

    def evaluate():
        nz = RecordingNoise(5)
        p = cpu.propose(16, nz, estimator="fp++")
        w2, _ = nz.partial_redraw(p.w, 4)  # a latent-local move's proposal
        xa, qa = cpu.evaluate(w2, p.eps, estimator="fp++")
        xb, qb = gpu.evaluate(w2, p.eps, estimator="fp++")
        ok_x, dx = _close(xa, xb, 1e-9)
        ok_q, dq = _close(qa, qb, 1e-6)
        return ok_x and ok_q and on_cpu(xb, qb), f"x {dx}; log q {dq}"

    t.check("flow.evaluate (latent move) on cuda vs cpu", evaluate)
    t.check("flow.sample on cuda vs cpu", lambda: _close(cpu.sample(64, seed=2), gpu.sample(64, seed=2), 1e-9))
    t.add("flow noise drawn on", "INFO", ", ".join(sorted(devices)) +
          ("" if "cuda" in devices else " (PerturbedFlow does not pass its device to Noise yet)"))

    if not quick:
        def timing():
            B = 4096
            nz = RecordingNoise(1)
            gpu.propose(B, nz, estimator="fp++")  # warm-up
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            gpu.propose(B, nz, estimator="fp++")
            torch.cuda.synchronize(dev)
            ms = 1e3 * (time.perf_counter() - t0)
            return "INFO", f"propose {B} fp++ (D={gpu.dim}, {gpu.n_steps} steps): {ms:.1f} ms"

        t.check("flow timing on cuda", timing)


def noise_timing(dev: torch.device):
    from openmm_flowpert.noise import Noise

    B, D = 4096, 3000

    def best(fn, reps=5):
        fn()
        torch.cuda.synchronize(dev)
        out = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(dev)
            out = min(out, time.perf_counter() - t0)
        return 1e3 * out

    gpu, cpu = Noise(1, device=dev), Noise(1)
    t_gpu = best(lambda: gpu.gaussian(B, D))
    t_cpu = best(lambda: cpu.gaussian(B, D).to(dev))
    return "INFO", f"gaussian {B}x{D}: {t_gpu:.2f} ms on the GPU, {t_cpu:.1f} ms CPU + copy"


# -- building the CUDA library -------------------------------------------------------------------------
def build_library(archs: str) -> Path:
    build = ROOT / "build" / "gpu-check"
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}",
           "-DFLOWPERT_WITH_CUDA=ON", f"-DFLOWPERT_CUDA_ARCHS={archs}"]
    for cmd in (cfg, ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{proc.stdout[-4000:]}")
    return build / "libflowpert_ops.so"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="build the CUDA library into build/gpu-check first")
    ap.add_argument("--archs", default=None, help="cubin architectures for --build (default: this GPU's)")
    ap.add_argument("--quick", action="store_true", help="skip the timings")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}): nothing to check")
        return 0
    dev = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(dev)
    if args.build and not os.environ.get("FLOWPERT_GPU_CHECK_BUILT"):
        t0 = time.perf_counter()
        try:
            lib = build_library(args.archs or f"{major}{minor}")
        except Exception as err:
            print(f"gpu_check: the CUDA build failed; checking the installed library instead\n{err}")
        else:
            print(f"gpu_check: built {lib} in {time.perf_counter() - t0:.0f} s", flush=True)
            env = {**os.environ, "FLOWPERT_OPS_LIBRARY": str(lib), "FLOWPERT_GPU_CHECK_BUILT": "1"}
            rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--build"]
            return subprocess.run([sys.executable, __file__, *rest], env=env).returncode

    how = _import_package()
    import openmm_flowpert.noise as noise
    from openmm_flowpert.noise import _dispatch

    t = Table()
    lib = getattr(_dispatch._impl, "LIBRARY", None)
    print(f"gpu_check: {torch.cuda.get_device_name(dev)} (sm_{major}{minor}), torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}); {how}")
    print(f"  noise backend {noise.backend()}, library {lib or '-'} ({_dispatch.fallback_reason() or 'loaded'})\n")
    t.add("native library loaded", noise.backend() == "native", str(lib or _dispatch.fallback_reason()))
    t.add("library has CUDA kernels", _has_cuda() if lib else None,
          "" if _has_cuda() else "rebuild with FLOWPERT_CUDA=1, or run with --build")
    if lib and _has_cuda():
        kernel_checks(t, dev)
    noise_checks(t, dev)
    try:
        flow_checks(t, dev, args.quick)
    except Exception as err:
        t.add("flow checks", False, f"{type(err).__name__}: {str(err).strip()[:160]}")
    if not args.quick and lib and _has_cuda():
        t.check("noise timing on cuda", lambda: noise_timing(dev))
    return t.print()


if __name__ == "__main__":
    sys.exit(main())
