"""Automatic OpenMM platform and worker-count choice.

Small systems run fastest on Reference (the CPU platform's thread wake-up dominates them), larger
ones on the CPU platform with one context per worker thread; the measurements behind the choice are
in docs/benchmarks.md, section 4 ("Numbers behind the automatic platform and worker choice").
"""
from __future__ import annotations

import os
from typing import List, Union

import openmm

__all__ = ["SMALL_SYSTEM_ATOMS", "available_platforms", "platform_candidates", "default_n_workers",
           "usable_cpus"]

#: Below this many atoms the automatic choice prefers Reference over the CPU platform.
SMALL_SYSTEM_ATOMS = 50

_GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")


def usable_cpus() -> int:
    """Number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def available_platforms() -> List[str]:
    """Names of the OpenMM platforms whose plugins loaded in this process."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def platform_candidates(n_atoms: int, platform: Union[None, str, openmm.Platform] = None) -> List[str]:
    """Platform names to try, best first.

    A user choice (name or ``openmm.Platform``) is the only candidate. Otherwise: CUDA, OpenCL
    (GPU platforms; a registered one that cannot create a context is skipped at context creation),
    then CPU and Reference, with Reference first for systems below :data:`SMALL_SYSTEM_ATOMS` atoms.
    """
    if platform is not None:
        return [platform.getName() if isinstance(platform, openmm.Platform) else str(platform)]
    have = available_platforms()
    cpu_order = ["Reference", "CPU"] if n_atoms < SMALL_SYSTEM_ATOMS else ["CPU", "Reference"]
    return [p for p in ("CUDA", "OpenCL", "HIP") + tuple(cpu_order) if p in have]


def default_n_workers(platform_name: str, n_atoms: int) -> int:
    """Worker threads (= contexts) for a platform and system size.

    1 on GPU platforms; 1 on Reference below :data:`SMALL_SYSTEM_ATOMS` atoms (mostly Python work
    under the GIL: a second worker does not help); otherwise the usable CPU count: OpenMM releases
    the GIL while it computes, so contexts in several threads run in parallel (docs/benchmarks.md
    section 4). With several workers the CPU platform gets ``Threads = cpus // n_workers`` per
    context.
    """
    if platform_name in _GPU_PLATFORMS:
        return 1
    if platform_name == "Reference" and n_atoms < SMALL_SYSTEM_ATOMS:
        return 1
    return usable_cpus()
