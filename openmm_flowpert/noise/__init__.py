"""Every random number the estimators and proposals draw comes from here.

The noise layer hides where numbers come from: a counter-based native op library when it is
loaded, a pure-torch fallback otherwise, with the same semantics. Draws are keyed by
``(seed, stream, offset)``: a :class:`Noise` source with a given seed and stream produces the same
sequence of draws in every run, whatever the thread count and whatever the device.

Draws can be made on a torch device (``Noise(seed, device="cuda")`` or ``device=`` per call). On a
CUDA device the native library's CUDA kernels draw there (same Philox streams, same bits as the CPU
kernels); without them (a CPU-only build, the torch fallback) the numbers are drawn on the CPU and
copied, so the device never changes a number. What does change the numbers is the backend
(:func:`backend`: ``"native"`` or ``"torch"``): record it with seeded results and check it with
:func:`check_backend` when they are resumed or reproduced.

All arrays are float64. Latent and probe vectors live in R^D; for molecules (``n_particles > 0``,
D = 3N) the mean-free subspace of dimension d = 3N - 3 is used (docs/algorithm.md section 6).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import torch


__all__ = ["Noise", "project_mean_free", "backend", "check_backend", "kernel_path", "NoiseBackendWarning",
           "BACKEND_KEY"]

#: Suggested metadata key under which flow files and checkpoints record :func:`backend`.
BACKEND_KEY = "noise_backend"

Device = Union[str, torch.device, None]


def backend() -> str:
    """Name of the active noise backend: ``"native"`` or ``"torch"``.

    CPU and CUDA kernels of the native library draw the same numbers, so the name does not say
    where draws are made (see :func:`kernel_path`); the two backends draw different numbers.
    """
    from . import _dispatch

    return _dispatch.backend_name()


class NoiseBackendWarning(UserWarning):
    """A flow file or checkpoint was made with another noise backend than the active one."""


def check_backend(recorded: Optional[str], what: str) -> None:
    """Warn (:class:`NoiseBackendWarning`) when ``what`` was made with another noise backend.

    Parameters
    ----------
    recorded : str or None
        The :func:`backend` stored when the file was written (e.g. under :data:`BACKEND_KEY` in a
        flow's metadata or a checkpoint). None (not recorded, older files) never warns.
    what : str
        What was loaded, for the message: ``"flow file 'ala2.pt'"``, ``"checkpoint 'run.ckpt'"``.

    The two backends draw different numbers from the same seeds, so a run resumed or repeated
    with the other one continues differently (still correct, but not reproducible bit for bit).
    """
    if recorded is None:
        return
    from . import _dispatch

    active = backend()
    if str(recorded) == active:
        return
    if active == "torch":
        why = _dispatch.fallback_reason()
        fix = ("build the native noise library (`make install`, or `pip install --no-build-isolation -e .`) "
               f"to reproduce them{f' [{why}]' if why else ''}")
    elif str(recorded) == "torch":
        fix = "set FLOWPERT_NATIVE=0 to reproduce them with the torch fallback"
    else:
        fix = f"use an openmm-flowpert whose noise backend is {recorded!r} to reproduce them"
    warnings.warn(f"{what} was made with the {recorded!r} noise backend but this process uses {active!r}: "
                  f"seeded results (proposals, resumed chains) will differ from the original run; {fix}",
                  NoiseBackendWarning, stacklevel=3)


def kernel_path(device: Device = None) -> str:
    """Where draws for ``device`` (default: the CPU) are made in this process.

    ``"native-cpu"``, ``"native-cuda"`` (the CUDA kernels), ``"native-cpu+copy"`` (a CUDA device
    but a library without CUDA kernels, or they failed), ``"torch"`` or ``"torch+copy"``.
    """
    from . import _dispatch

    return _dispatch.kernel_path(_device(device))


def _device(device: Device) -> Optional[torch.device]:
    """A torch.device with an index for CUDA (the current device), None for the CPU."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def project_mean_free(x: torch.Tensor, n_particles: int) -> torch.Tensor:
    """Remove the centre of mass (per Cartesian component) from vectors of length 3N.

    ``x`` has shape (..., 3N); returns a tensor of the same shape. A no-op when ``n_particles == 0``.
    """
    if n_particles <= 0:
        return x
    shape = x.shape
    y = x.reshape(shape[:-1] + (n_particles, 3))
    return (y - y.mean(dim=-2, keepdim=True)).reshape(shape)


class Noise:
    """A reproducible source of the noise that flow perturbation needs.

    Parameters
    ----------
    seed : int
        Seed of the counter-based generator.
    stream : int, default 0
        Independent stream (e.g. an MPI rank or a replica index).
    offset : int, default 0
        Position in the sequence of calls (restored from :meth:`state`).
    device : str or torch.device, optional
        Where draws are returned (default: the CPU); each draw method also takes ``device=`` for
        one call. The numbers do not depend on it: on a CUDA device the native CUDA kernels draw
        the same bits as the CPU kernels (or the CPU draws and copies when they are absent).

    Every call advances an internal offset, so consecutive calls give fresh numbers and the
    whole sequence is a pure function of ``(seed, stream)``, whatever the devices of the calls.

    Examples
    --------
    >>> noise = Noise(seed=1)
    >>> g = noise.gaussian(4, 9, n_particles=3)   # mean-free Gaussians in R^9, d = 6
    >>> g.reshape(4, 3, 3).mean(1).abs().max() < 1e-12
    tensor(True)
    """

    def __init__(self, seed: int, stream: int = 0, offset: int = 0, device: Device = None):
        self.seed = int(seed)
        self.stream = int(stream)
        self.offset = int(offset)
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Noise(device={str(dev)!r}): torch sees no CUDA device here")
        self.device = dev  #: default device of the draws

    def _next(self) -> int:
        off = self.offset
        self.offset += 1
        return off

    def _dev(self, device: Device) -> Optional[torch.device]:
        return _device(self.device if device is None else device)

    def state(self) -> dict:
        """Plain-Python state (seed, stream, offset) for checkpoints.

        The device is not part of it: draws do not depend on it, so a checkpoint resumes on any
        device (``Noise(**state, device=...)``).
        """
        return {"seed": self.seed, "stream": self.stream, "offset": self.offset}

    def __repr__(self) -> str:
        dev = "" if self.device.type == "cpu" else f", device={str(self.device)!r}"
        return f"Noise(seed={self.seed}, stream={self.stream}, offset={self.offset}{dev})"

    def gaussian(self, batch: int, dim: int, n_particles: int = 0, sets: int = 0,
                 device: Device = None) -> torch.Tensor:
        """Standard normal draws of shape (batch, dim), or (batch, sets, dim) when ``sets > 0``.

        With ``n_particles > 0`` (dim = 3 * n_particles) each vector is projected onto the mean-free
        subspace, where it is a standard normal of dimension d = dim - 3.
        """
        from . import _dispatch

        rows = batch * max(sets, 1)
        g = _dispatch.gaussian(rows, dim, n_particles, self.seed, self.stream, self._next(), self._dev(device))
        return g.reshape(batch, sets, dim) if sets > 0 else g

    def uniform(self, n: int, device: Device = None) -> torch.Tensor:
        """Uniform draws in the open interval (0, 1), shape (n,)."""
        from . import _dispatch

        return _dispatch.uniform(n, self.seed, self.stream, self._next(), self._dev(device))

    def chi(self, n: int, d: int, device: Device = None) -> torch.Tensor:
        """Draws of the norm of a d-dimensional standard normal vector (chi distribution), shape (n,).

        With the native library the norms are summed in a fixed order, so they are the same bits
        on every CPU and GPU.
        """
        from . import _dispatch

        return _dispatch.chi(n, d, self.seed, self.stream, self._next(), self._dev(device))

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
            float64, on ``w``'s device (drawn there by the CUDA kernel when ``w`` is on a GPU).
        z_new : Tensor (B, D) or None
            ``project_mean_free(w_new)`` when ``n_particles > 0``.

        The move is reversible with respect to N(0, I_D): the chosen coordinates are uniform without
        replacement and independent of ``w``.
        """
        from . import _dispatch

        B, D = w.shape
        kk = torch.as_tensor(k, dtype=torch.int64).expand(B).contiguous()
        if B > 0 and (int(kk.min()) < 0 or int(kk.max()) > D):
            raise ValueError(f"k must lie in [0, {D}] (number of coordinates per row); got {k}")
        w_new = _dispatch.partial_redraw(w, kk, self.seed, self.stream, self._next())
        z_new = project_mean_free(w_new, n_particles) if n_particles > 0 else None
        return w_new, z_new
