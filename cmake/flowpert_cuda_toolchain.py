"""Find the CUDA pieces the optional kernels need (FLOWPERT_WITH_CUDA=ON), matching torch's CUDA.

    python cmake/flowpert_cuda_toolchain.py [--crt-include DIR]

Prints KEY=VALUE lines for cmake/FlowpertCuda.cmake:

    CUDA_VERSION    torch.version.cuda (the kernels must use the same CUDA major version)
    NVRTC_LIB       libnvrtc.so.<major>           NVRTC_INCLUDE   folder of nvrtc.h
    CUDART_LIB      libcudart.so.<major>          CUDART_INCLUDE  folder of cuda_runtime_api.h
    CRT_INCLUDE     folder holding crt/host_defines.h (needed by cuda_runtime_api.h)

or a single line ``ERROR=<what is missing, and how to get it>``. Exit status 0 either way.

Where it looks, in this order:

1. the nvidia wheels of the torch environment: every folder of the ``nvidia`` namespace package
   (CUDA 12: nvidia/cuda_nvrtc, nvidia/cuda_runtime, nvidia/cuda_nvcc (headers only); CUDA 13:
   nvidia/cu13 and friends);
2. CUDA toolkits: $FLOWPERT_CUDA_ROOT, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda-X.Y, /usr/local/cuda.

A library counts only with its major version's soname (libnvrtc.so.12 for a CUDA 12.8 torch), and
a toolkit's headers only when its cuda_runtime_api.h has torch's major version, so a CUDA 13 nvcc
next to a CUDA 12.8 torch is skipped. ``find_toolchain`` is also imported by the tests.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
from typing import Dict, List, Optional, Tuple

LIB_DIRS = ("lib", "lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
INCLUDE_DIRS = ("include", "targets/x86_64-linux/include", "targets/sbsa-linux/include")


def _wheel_roots() -> List[str]:
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    roots: List[str] = []
    for base in spec.submodule_search_locations:
        roots += [d for d in sorted(glob.glob(os.path.join(base, "*"))) if os.path.isdir(d)]
    return roots


def _toolkit_roots(version: str) -> List[str]:
    roots = [os.environ.get(v, "") for v in ("FLOWPERT_CUDA_ROOT", "CUDA_HOME", "CUDA_PATH")]
    roots += [f"/usr/local/cuda-{version}", f"/usr/local/cuda-{version.split('.')[0]}", "/usr/local/cuda"]
    out: List[str] = []
    for r in roots:
        if r and os.path.isdir(r) and os.path.realpath(r) not in {os.path.realpath(o) for o in out}:
            out.append(r)
    return out


def _runtime_major(include: str) -> Optional[int]:
    """Major CUDA version of the cuda_runtime_api.h in ``include`` (CUDART_VERSION 12080 -> 12)."""
    try:
        with open(os.path.join(include, "cuda_runtime_api.h"), errors="replace") as fh:
            m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", fh.read())
    except OSError:
        return None
    return int(m.group(1)) // 1000 if m else None


def _pick(roots: List[str], lib: str, header: str, major: int, wheel: set) -> Optional[Tuple[str, str]]:
    """First root with both ``lib`` (in one of LIB_DIRS) and ``header`` (in one of INCLUDE_DIRS)."""
    for root in roots:
        libs = [os.path.join(root, d, lib) for d in LIB_DIRS if os.path.isfile(os.path.join(root, d, lib))]
        incs = [os.path.join(root, d) for d in INCLUDE_DIRS if os.path.isfile(os.path.join(root, d, header))]
        if not libs or not incs:
            continue
        if root not in wheel and header == "cuda_runtime_api.h" and _runtime_major(incs[0]) != major:
            continue
        return libs[0], incs[0]
    return None


def find_toolchain(crt_include: Optional[str] = None) -> Tuple[Optional[Dict[str, str]], Optional[str]]:
    """(paths, None) when the CUDA kernels can be built here, else (None, reason)."""
    try:
        import torch
    except ImportError as err:
        return None, f"torch is not importable ({err})"
    version = torch.version.cuda
    if not version:
        return None, f"torch {torch.__version__} is a CPU build (no CUDA): the CUDA kernels would be unusable"
    major = int(version.split(".")[0])
    wheels = _wheel_roots()
    roots = wheels + _toolkit_roots(version)
    wheel = set(wheels)
    nvrtc = _pick(roots, f"libnvrtc.so.{major}", "nvrtc.h", major, wheel)
    if nvrtc is None:
        return None, (f"NVRTC {major} (libnvrtc.so.{major} + nvrtc.h) not found in the nvidia wheels or a CUDA "
                      f"{major} toolkit; torch {torch.__version__} normally installs nvidia-cuda-nvrtc")
    cudart = _pick(roots, f"libcudart.so.{major}", "cuda_runtime_api.h", major, wheel)
    if cudart is None:
        return None, (f"CUDA {major} runtime (libcudart.so.{major} + cuda_runtime_api.h) not found in the nvidia "
                      f"wheels or a CUDA {major} toolkit")
    crt = crt_include or os.environ.get("FLOWPERT_CUDA_CRT_INCLUDE") or ""
    if not crt:
        candidates = [cudart[1]]
        for root in roots:
            for d in INCLUDE_DIRS:
                inc = os.path.join(root, d)
                if root in wheel or _runtime_major(inc) == major:
                    candidates.append(inc)
        crt = next((c for c in candidates if os.path.isfile(os.path.join(c, "crt", "host_defines.h"))), "")
    if not crt or not os.path.isfile(os.path.join(crt, "crt", "host_defines.h")):
        pin = "nvidia-cuda-nvcc-cu12==12.8.93" if major == 12 else f"a CUDA {major} toolkit"
        return None, (f"crt/host_defines.h (CUDA {major}) not found: pip install {pin} (headers only) or set "
                      f"FLOWPERT_CUDA_CRT_INCLUDE to a CUDA {major} include/ folder")
    return {"CUDA_VERSION": version, "NVRTC_LIB": nvrtc[0], "NVRTC_INCLUDE": nvrtc[1], "CUDART_LIB": cudart[0],
            "CUDART_INCLUDE": cudart[1], "CRT_INCLUDE": crt}, None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crt-include", default="", help="folder holding crt/host_defines.h")
    args = ap.parse_args(argv)
    found, why = find_toolchain(args.crt_include or None)
    if found is None:
        print(f"ERROR={why}")
    else:
        for k, v in found.items():
            print(f"{k}={v}")


if __name__ == "__main__":
    main()
