"""Chooses the native op library when it loads, the torch fallback otherwise.

``FLOWPERT_NATIVE=0`` in the environment forces the fallback. When the fallback is used, a
one-line notice is logged once per process.
"""
from __future__ import annotations

import logging
import math
import os

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


def gaussian(rows, dim, n_particles, seed, stream, offset):
    return _impl.gaussian(rows, dim, n_particles, seed, stream, offset)


def uniform(n, seed, stream, offset):
    return _impl.uniform(n, seed, stream, offset)


def partial_redraw(w, k, seed, stream, offset):
    return _impl.partial_redraw(w, k, seed, stream, offset)


def directions(rows, dim, n_particles, seed, stream, offset):
    """Unit directions u (rows, dim) and norms r (rows,) of the Gaussian rows g = u * r."""
    if _impl is not _fallback:
        return _impl.directions(rows, dim, n_particles, seed, stream, offset)
    g = _fallback.gaussian(rows, dim, n_particles, seed, stream, offset)
    r = torch.linalg.vector_norm(g, dim=-1)
    return g / r.unsqueeze(-1), r


def log_stretch(zp, zm, two_eps):
    """log(||zp - zm||_2 / two_eps) per row, float64. Differentiable through the torch path, which
    is used whenever autograd needs it or the native library is absent."""
    needs_grad = torch.is_grad_enabled() and (zp.requires_grad or zm.requires_grad)
    if _impl is not _fallback and not needs_grad:
        return _impl.log_stretch(zp, zm, two_eps)
    diff = zp.to(torch.float64) - zm.to(torch.float64)
    return torch.log(torch.linalg.vector_norm(diff, dim=-1)) - math.log(two_eps)
