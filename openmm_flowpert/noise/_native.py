"""The native noise ops (``torch.ops.flowpert``), with the call signatures of :mod:`._fallback`.

``libflowpert_ops.so`` is built from ``csrc/`` by ``setup.py`` (CMake) into ``openmm_flowpert/lib``.
Importing this module loads it and raises ``OSError`` when it is missing. Any process that
deserializes a TorchScript model or an openmm-torch ``TorchForce`` calling these ops must load the
library first: call :func:`load_library`, or import :mod:`openmm_flowpert.noise._dispatch` (the
first draw of a :class:`~openmm_flowpert.noise.Noise` does), which loads it when available.

Draws are counter-based Philox4x32-10 keyed by ``(seed, stream, offset)`` and the row and element
index, so outputs are bit-identical for any thread count and between the CPU and CUDA kernels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import torch

LIB_NAME = "libflowpert_ops.so"
LIB_DIR = Path(__file__).resolve().parent.parent / "lib"


def library_path() -> Path:
    """Where the library is looked for: ``$FLOWPERT_OPS_LIBRARY`` if set, else ``openmm_flowpert/lib``."""
    env = os.environ.get("FLOWPERT_OPS_LIBRARY")
    return Path(env) if env else LIB_DIR / LIB_NAME


def load_library() -> Path:
    """Register ``torch.ops.flowpert`` in this process (idempotent). Raises ``OSError`` if missing."""
    path = library_path()
    if not path.is_file():
        raise OSError(f"{LIB_NAME} not found in {path.parent}; build it with "
                      "`pip install --no-build-isolation -e .`")
    if str(path) not in torch.ops.loaded_libraries:
        torch.ops.load_library(str(path))
    return path


LIBRARY = load_library()
_ops = torch.ops.flowpert


def _i64(x: int) -> int:
    """Any Python int as the signed 64-bit value with the same low 64 bits (the ops' key words)."""
    x = int(x) & 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= (1 << 63) else x


def has_cuda() -> bool:
    """Whether the library was built with the CUDA kernels."""
    return bool(_ops.has_cuda())


def gaussian(rows: int, dim: int, n_particles: int, seed: int, stream: int, offset: int) -> torch.Tensor:
    return _ops.gaussian(rows, dim, n_particles, _i64(seed), _i64(stream), _i64(offset))


def directions(rows: int, dim: int, n_particles: int, seed: int, stream: int,
               offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _ops.directions(rows, dim, n_particles, _i64(seed), _i64(stream), _i64(offset))


def uniform(n: int, seed: int, stream: int, offset: int) -> torch.Tensor:
    return _ops.uniform(n, _i64(seed), _i64(stream), _i64(offset))


def partial_redraw(w: torch.Tensor, k: torch.Tensor, seed: int, stream: int, offset: int) -> torch.Tensor:
    if w.is_cuda and not has_cuda():
        return _ops.partial_redraw(w.cpu(), k.cpu(), _i64(seed), _i64(stream), _i64(offset)).to(w.device)
    return _ops.partial_redraw(w, k, _i64(seed), _i64(stream), _i64(offset))


def log_stretch(zp: torch.Tensor, zm: torch.Tensor, two_eps: float) -> torch.Tensor:
    if zp.is_cuda and not has_cuda():
        return _ops.log_stretch(zp.cpu(), zm.cpu(), float(two_eps)).to(zp.device)
    return _ops.log_stretch(zp, zm, float(two_eps))
