"""Every random number the estimators and proposals draw comes from here.

The noise layer hides where numbers come from: a counter-based native op library when it is
loaded, a pure-torch fallback otherwise, with the same semantics. Draws are keyed by
``(seed, stream, offset)``: a :class:`Noise` source with a given seed and stream produces the same
sequence of draws in every run, whatever the thread count.

All arrays are float64. Latent and probe vectors live in R^D; for molecules (``n_particles > 0``,
D = 3N) the mean-free subspace of dimension d = 3N - 3 is used (ALGORITHM.md section 6).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _fallback

__all__ = ["Noise", "project_mean_free", "unit_directions", "effective_dim", "backend", "log_stretch"]


def backend() -> str:
    """Name of the active noise backend: ``"native"`` or ``"torch"``."""
    from . import _dispatch

    return _dispatch.backend_name()


def effective_dim(dim: int, n_particles: int) -> int:
    """Dimension of the subspace the noise lives in: ``dim - 3`` when mean-free, else ``dim``."""
    return dim - 3 if n_particles > 0 else dim


def project_mean_free(x: torch.Tensor, n_particles: int) -> torch.Tensor:
    """Remove the centre of mass (per Cartesian component) from vectors of length 3N.

    ``x`` has shape (..., 3N); returns a tensor of the same shape. A no-op when ``n_particles == 0``.
    """
    if n_particles <= 0:
        return x
    shape = x.shape
    y = x.reshape(shape[:-1] + (n_particles, 3))
    return (y - y.mean(dim=-2, keepdim=True)).reshape(shape)


def unit_directions(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split vectors into unit directions and norms along the last axis: ``g = u * r``."""
    r = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    return g / r, r.squeeze(-1)


def log_stretch(zp: torch.Tensor, zm: torch.Tensor, two_eps: float) -> torch.Tensor:
    """``log(||zp - zm||_2 / two_eps)`` per row of (B, D) tensors, shape (B,), float64.

    A fused native reduction when the library is loaded and no gradient is needed; torch otherwise.
    """
    from . import _dispatch

    return _dispatch.log_stretch(zp, zm, two_eps)


class Noise:
    """A reproducible source of the noise that flow perturbation needs.

    Parameters
    ----------
    seed : int
        Seed of the counter-based generator.
    stream : int, default 0
        Independent stream (e.g. an MPI rank or a replica index).

    Every call advances an internal offset, so consecutive calls give fresh numbers and the
    whole sequence is a pure function of ``(seed, stream)``.

    Examples
    --------
    >>> noise = Noise(seed=1)
    >>> g = noise.gaussian(4, 9, n_particles=3)   # mean-free Gaussians in R^9, d = 6
    >>> g.reshape(4, 3, 3).mean(1).abs().max() < 1e-12
    tensor(True)
    """

    def __init__(self, seed: int, stream: int = 0, offset: int = 0):
        self.seed = int(seed)
        self.stream = int(stream)
        self.offset = int(offset)

    def _next(self) -> int:
        off = self.offset
        self.offset += 1
        return off

    def state(self) -> dict:
        """Plain-Python state (seed, stream, offset) for checkpoints."""
        return {"seed": self.seed, "stream": self.stream, "offset": self.offset}

    def gaussian(self, batch: int, dim: int, n_particles: int = 0, sets: int = 0) -> torch.Tensor:
        """Standard normal draws of shape (batch, dim), or (batch, sets, dim) when ``sets > 0``.

        With ``n_particles > 0`` (dim = 3 * n_particles) each vector is projected onto the mean-free
        subspace, where it is a standard normal of dimension d = dim - 3.
        """
        from . import _dispatch

        rows = batch * max(sets, 1)
        g = _dispatch.gaussian(rows, dim, n_particles, self.seed, self.stream, self._next())
        return g.reshape(batch, sets, dim) if sets > 0 else g

    def directions(self, batch: int, dim: int, n_particles: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unit probe directions u (batch, dim) and norms r (batch,) of Gaussian draws g = u * r.

        ``g`` is what :meth:`gaussian` would return for the same call (mean-free when
        ``n_particles > 0``), so ``u`` is uniform on the unit sphere of that subspace and ``r`` is
        chi-distributed with ``effective_dim(dim, n_particles)`` degrees of freedom.
        """
        from . import _dispatch

        return _dispatch.directions(batch, dim, n_particles, self.seed, self.stream, self._next())

    def uniform(self, n: int) -> torch.Tensor:
        """Uniform draws in the open interval (0, 1), shape (n,)."""
        from . import _dispatch

        return _dispatch.uniform(n, self.seed, self.stream, self._next())

    def chi(self, n: int, d: int) -> torch.Tensor:
        """Draws of the norm of a d-dimensional standard normal vector (chi distribution), shape (n,)."""
        return torch.linalg.vector_norm(self.gaussian(n, d), dim=-1)

    def partial_redraw(self, w: torch.Tensor, k: Union[int, torch.Tensor],
                       n_particles: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Redraw ``k`` randomly chosen coordinates of each row of ``w`` from N(0, 1).

        Parameters
        ----------
        w : Tensor, shape (B, D)
            Unprojected latent vectors (the chain state); other coordinates are copied unchanged.
        k : int or Tensor of shape (B,)
            Number of coordinates to redraw per row (may differ per row), 0 <= k <= D.
        n_particles : int
            If > 0, also return the mean-free projection of the new rows.

        Returns
        -------
        w_new : Tensor (B, D)
        z_new : Tensor (B, D) or None
            ``project_mean_free(w_new)`` when ``n_particles > 0``.

        The move is reversible with respect to N(0, I_D): the chosen coordinates are uniform without
        replacement and independent of ``w``.
        """
        from . import _dispatch

        B, D = w.shape
        kk = torch.as_tensor(k, dtype=torch.int64).expand(B).contiguous()
        if int(kk.min()) < 0 or int(kk.max()) > D:
            raise ValueError(f"k must lie in [0, {D}] (number of coordinates per row); got {k}")
        w_new = _dispatch.partial_redraw(w, kk, self.seed, self.stream, self._next())
        z_new = project_mean_free(w_new, n_particles) if n_particles > 0 else None
        return w_new, z_new
