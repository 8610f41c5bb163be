"""Install openmm-flowpert; builds the optional native noise ops with CMake on the way.

The native library (openmm_flowpert/lib/libflowpert_ops.so) needs torch at build time, so build
with ``pip install --no-build-isolation``. Anything missing (cmake, a compiler, torch) or failing
only prints a notice: the pure-Python package is installed and uses the torch fallback.

Environment switches:
  FLOWPERT_BUILD_NATIVE=0   skip the native build
  FLOWPERT_CUDA=auto        (default) also compile the CUDA kernels (NVRTC route, csrc/cuda/README.md)
                            when torch has CUDA and that version's NVRTC, runtime and crt/ headers are
                            found (cmake/flowpert_cuda_toolchain.py); else CPU kernels only, with a notice
  FLOWPERT_CUDA=1           always try the CUDA kernels (a notice names what failed; then CPU only)
  FLOWPERT_CUDA=0           CPU kernels only
  FLOWPERT_CUDA_ARCHS, FLOWPERT_CUDA_CRT_INCLUDE   passed on to CMake (cubin targets, default
                            "80;86;89;90;100;120"; folder holding crt/host_defines.h of torch's CUDA)

CPU and CUDA kernels draw the same bits, so a CPU-only build changes no result: a
``Noise(device="cuda")`` then draws on the CPU and copies.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIB_FILE = "libflowpert_ops.so"


class CMakeLibrary(Extension):
    """Placeholder extension: its 'build' is a CMake project producing a plain shared library."""

    def __init__(self, name):
        super().__init__(name, sources=[], optional=True)


class BuildNative(build_ext):
    def get_ext_filename(self, fullname):
        if fullname.endswith("flowpert_ops"):
            return os.path.join(*fullname.split(".")[:-1], LIB_FILE)
        return super().get_ext_filename(fullname)

    def copy_extensions_to_source(self):  # editable installs: put the library into the source tree
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            filename = self.get_ext_filename(self.get_ext_fullname(ext.name))
            regular_file = os.path.join(self.build_lib, filename)
            inplace_file = os.path.join(build_py.get_package_dir("openmm_flowpert.lib"), os.path.basename(filename))
            if os.path.exists(regular_file):
                os.makedirs(os.path.dirname(inplace_file), exist_ok=True)
                self.copy_file(regular_file, inplace_file, level=self.verbose)

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        try:
            built = self._cmake_build()
        except Exception as err:  # never fail the install over the optional library
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"openmm-flowpert: native noise ops not built ({msg}); the torch fallback will be used")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)

    def _cmake_build(self) -> Path:
        if os.environ.get("FLOWPERT_BUILD_NATIVE", "1") == "0":
            raise RuntimeError("FLOWPERT_BUILD_NATIVE=0")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        import torch  # the runtime torch: needs --no-build-isolation

        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        base = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                f"-DPython3_EXECUTABLE={sys.executable}"]
        jobs = str(os.cpu_count() or 2)
        want_cuda = self._want_cuda()
        cuda_opts = [f"-D{v}={os.environ[v]}" for v in ("FLOWPERT_CUDA_ARCHS", "FLOWPERT_CUDA_CRT_INCLUDE")
                     if os.environ.get(v)]
        for cuda in ([True, False] if want_cuda else [False]):
            try:
                self._run(base + [f"-DFLOWPERT_WITH_CUDA={'ON' if cuda else 'OFF'}"] + (cuda_opts if cuda else []))
                self._run([cmake, "--build", str(build_dir), "--parallel", jobs])
                return build_dir / LIB_FILE
            except RuntimeError as err:
                if not cuda:
                    raise
                print(f"openmm-flowpert: CUDA kernels not built ({err}); building the CPU ops only")
        raise AssertionError("unreachable")

    @staticmethod
    def _want_cuda() -> bool:
        mode = os.environ.get("FLOWPERT_CUDA", "auto").strip().lower()
        if mode in ("0", "off", "no", "false"):
            return False
        if mode != "auto":
            return True
        sys.path.insert(0, str(ROOT / "cmake"))
        try:
            from flowpert_cuda_toolchain import find_toolchain

            found, why = find_toolchain()
        except Exception as err:  # the lookup itself must never break the install
            found, why = None, f"toolchain lookup failed: {err}"
        finally:
            sys.path.pop(0)
        if found is None:
            print(f"openmm-flowpert: CUDA kernels not built ({why}); building the CPU ops only")
        return found is not None

    @staticmethod
    def _run(cmd):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(proc.stdout)
        if proc.returncode != 0:
            lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
            first = next((i for i, line in enumerate(lines) if "error" in line.lower()), None)
            if first is None:
                raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}")
            raise RuntimeError(" ".join(lines[first:first + 2]))


setup(
    name="openmm-flowpert",
    version="0.1.0",
    description="Flow perturbation: unbiased Boltzmann sampling from normalizing flows in OpenMM",
    packages=find_packages(include=["openmm_flowpert", "openmm_flowpert.*"]),
    package_data={"openmm_flowpert": ["data/*.pdb", "data/*.pt"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["flowpert=openmm_flowpert.cli:main"]},
    ext_modules=[CMakeLibrary("openmm_flowpert.lib.flowpert_ops")],
    cmdclass={"build_ext": BuildNative},
)
