"""The native noise ops (``torch.ops.flowpert``), with the call signatures of :mod:`._fallback`.

``libflowpert_ops.so`` is built from ``csrc/`` by ``setup.py`` (CMake) into ``openmm_flowpert/lib``.
Importing this module loads it and raises ``OSError`` when it is missing. Any process that
deserializes a TorchScript model or an openmm-torch ``TorchForce`` calling these ops must load the
library first: call :func:`load_library`, or import :mod:`openmm_flowpert.noise._dispatch` (the
first draw of a :class:`~openmm_flowpert.noise.Noise` does), which loads it when available.

Draws are counter-based Philox4x32-10 keyed by ``(seed, stream, offset)`` and the row and element
index, so outputs are bit-identical for any thread count and between the CPU and CUDA kernels. The
draw functions take a ``device``: a CUDA device uses the CUDA kernels when the library has them
(:func:`has_cuda`), otherwise the CPU kernels and a copy, with the same numbers either way.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Tuple

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


_HAS_CUDA = bool(_ops.has_cuda())
#: First error of the CUDA kernels in this process (e.g. no kernel image for the GPU, a driver too
#: old for the runtime); from then on draws for CUDA devices are made on the CPU and copied.
cuda_error: Optional[str] = None


def has_cuda() -> bool:
    """Whether the library was built with the CUDA kernels."""
    return _HAS_CUDA


def cuda_kernels(device: Optional[torch.device]) -> bool:
    """Whether draws for ``device`` run in the CUDA kernels (else on the CPU, then copied)."""
    return device is not None and device.type == "cuda" and _HAS_CUDA and cuda_error is None


def _to(out, device: Optional[torch.device]):
    if device is None or device.type == "cpu":
        return out
    if isinstance(out, tuple):
        return tuple(o.to(device) for o in out)
    return out.to(device)


def _on_device(cuda_call, cpu_call, device: Optional[torch.device]):
    """The CUDA kernel for a CUDA ``device`` when usable, else the CPU kernel and a copy (same bits)."""
    global cuda_error
    if cuda_kernels(device):
        try:
            return cuda_call()
        except RuntimeError as err:
            if "flowpert CUDA" not in str(err):  # only failures of the kernels themselves fall back
                raise
            cuda_error = str(err).strip().splitlines()[0]
            logging.getLogger("openmm_flowpert").warning(
                "openmm-flowpert: the CUDA noise kernels failed (%s); drawing on the CPU and copying "
                "(same numbers)", cuda_error)
    return _to(cpu_call(), device)


def gaussian(rows: int, dim: int, n_particles: int, seed: int, stream: int, offset: int,
             device: Optional[torch.device] = None) -> torch.Tensor:
    key = (rows, dim, n_particles, _i64(seed), _i64(stream), _i64(offset))
    return _on_device(lambda: _ops.gaussian(*key, device), lambda: _ops.gaussian(*key), device)


def directions(rows: int, dim: int, n_particles: int, seed: int, stream: int, offset: int,
               device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    key = (rows, dim, n_particles, _i64(seed), _i64(stream), _i64(offset))
    return _on_device(lambda: _ops.directions(*key, device), lambda: _ops.directions(*key), device)


def uniform(n: int, seed: int, stream: int, offset: int, device: Optional[torch.device] = None) -> torch.Tensor:
    key = (n, _i64(seed), _i64(stream), _i64(offset))
    return _on_device(lambda: _ops.uniform(*key, device), lambda: _ops.uniform(*key), device)


def partial_redraw(w: torch.Tensor, k: torch.Tensor, seed: int, stream: int, offset: int) -> torch.Tensor:
    """The result is on ``w``'s device (the CUDA kernel when ``w`` is on a GPU and it is usable)."""
    key = (_i64(seed), _i64(stream), _i64(offset))
    dev = w.device
    return _on_device(lambda: _ops.partial_redraw(w, k.to(dev), *key),
                      lambda: _ops.partial_redraw(w.cpu(), k.cpu(), *key), dev)
