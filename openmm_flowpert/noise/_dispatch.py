"""Chooses the native op library when it loads, the torch fallback otherwise.

``FLOWPERT_NATIVE=0`` in the environment forces the fallback. When the fallback is used, a
one-line notice is logged once per process.

Every draw takes a ``device`` (None: the CPU). The native library draws on a CUDA device with its
CUDA kernels when it has them, otherwise on the CPU and copies; the fallback always draws on the
CPU and copies. Either way the numbers do not depend on the device.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from . import _fallback


def _choose():
    if os.environ.get("FLOWPERT_NATIVE", "1") == "0":
        return _fallback, "native noise ops disabled (FLOWPERT_NATIVE=0)"
    try:
        from . import _native
    except Exception as err:  # missing or unloadable library: never fatal
        return _fallback, f"native noise ops not built ({err})"
    return _native, None


_impl, _reason = _choose()
if _reason is not None:
    logging.getLogger("openmm_flowpert").warning("openmm-flowpert: %s; using the torch fallback", _reason)


def backend_name() -> str:
    return "native" if _impl is not _fallback else "torch"


def fallback_reason() -> Optional[str]:
    """Why the torch fallback is active (None when the native library is used)."""
    return _reason


def kernel_path(device: Optional[torch.device]) -> str:
    """Where draws for ``device`` are made (see :func:`openmm_flowpert.noise.kernel_path`)."""
    on_cpu = device is None or device.type == "cpu"
    if _impl is _fallback:
        return "torch" if on_cpu else "torch+copy"
    if on_cpu:
        return "native-cpu"
    return "native-cuda" if _impl.cuda_kernels(device) else "native-cpu+copy"


def gaussian(rows, dim, n_particles, seed, stream, offset, device=None):
    return _impl.gaussian(rows, dim, n_particles, seed, stream, offset, device)


def uniform(n, seed, stream, offset, device=None):
    return _impl.uniform(n, seed, stream, offset, device)


def partial_redraw(w, k, seed, stream, offset):
    return _impl.partial_redraw(w, k, seed, stream, offset)


def chi(n, d, seed, stream, offset, device=None):
    """Norms of n standard normal vectors in R^d, shape (n,).

    Native: the norms of the ``directions`` op, summed in a fixed order (lane i mod 32, then a
    fixed tree), so they are the same bits on any CPU, thread count and GPU; torch's own norm
    differs between CPU instruction sets and between CPU and GPU. Fallback: torch's norm of the
    fallback Gaussians on the CPU."""
    if _impl is not _fallback:
        return _impl.directions(n, d, 0, seed, stream, offset, device)[1]
    g = _fallback.gaussian(n, d, 0, seed, stream, offset)
    return _fallback._to(torch.linalg.vector_norm(g, dim=-1), device)
