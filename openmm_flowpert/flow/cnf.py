"""A continuous normalizing flow integrated by a fixed-step explicit scheme, with its exact inverse.

The flow map is the *discrete* map f = Phi_K o ... o Phi_1 with x_0 = z (prior end, t = 0) and
x_k = Phi_k(x_{k-1}) = x_{k-1} + h_k Psi_k(x_{k-1}) (data end, t = 1). Everything -- estimators,
refreshes, inverses -- refers to this discrete map, not to the ODE it approximates.

Inverse of one step (docs/algorithm.md section 6): the fixed point y = x - h Psi(y), solved from the
fast approximation "one step of the same scheme backwards in time" by Anderson-accelerated
fixed-point iteration until the residual |y + h Psi(y) - x| is at round-off. Plain iteration
converges only when h Lip(Psi) < 1 and slowly near that limit; Anderson mixing of the last few
iterates converges in fewer evaluations on trained molecular flows (docs/benchmarks.md section 10)
and also where the plain iteration diverges. Either way the answer is checked by its residual: rows that do not reach
it are returned as NaN, which the samplers treat as rejected proposals. (The inverse is unique
wherever the discrete map is injective, which every density estimate of the flow assumes.)
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

SCHEMES = ("rk4", "midpoint", "euler")


def time_grid(n_steps: int, kind: str = "quadratic") -> torch.Tensor:
    """Times t_0 = 0 < ... < t_K = 1 (float64).

    ``"uniform"``: equal steps. ``"quadratic"``: t_k = 1 - (1 - k/K)^2, steps shrinking linearly
    toward the data end (t = 1), where flows trained on molecules are stiff.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    s = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    if kind == "uniform":
        return s
    if kind == "quadratic":
        return 1.0 - (1.0 - s) ** 2
    raise ValueError(f"unknown time grid {kind!r}; use 'uniform' or 'quadratic'")


class CNF(nn.Module):
    """Discrete flow map z -> y from a velocity field and a time grid.

    Parameters
    ----------
    velocity : nn.Module
        v(t, y) with ``forward(t (1,1) or (B,1), y (B, D)) -> (B, D)``.
    times : Tensor
        The time grid (K + 1 increasing values from 0 to 1).
    n_particles : int
        If > 0, y holds 3N Cartesian coordinates and the flow lives in the mean-free subspace
        (the velocity is projected onto it), d = 3N - 3. If 0, d = D.
    scheme : str
        ``"rk4"`` (default), ``"midpoint"`` or ``"euler"``.
    inverse_tol : float
        Convergence threshold of the fixed-point inverse (max-norm, relative to 1 + |x|).
    inverse_max_iter : int
        Iteration cap; rows not converged by then come back as NaN.
    inverse_memory : int
        Anderson-acceleration depth of the inverse (previous iterates mixed); 0 is plain
        fixed-point iteration.
    """

    def __init__(self, velocity: nn.Module, times: torch.Tensor, n_particles: int = 0, scheme: str = "rk4",
                 inverse_tol: float = 1e-13, inverse_max_iter: int = 100, inverse_memory: int = 5):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")
        times = torch.as_tensor(times, dtype=torch.float64)
        if times.dim() != 1 or times.numel() < 2 or not bool((times[1:] > times[:-1]).all()):
            raise ValueError("times must be an increasing 1-D grid with at least 2 points")
        dim = int(velocity.dim)
        if n_particles > 0 and dim != 3 * n_particles:
            raise ValueError(f"a mean-free flow over {n_particles} particles needs D = {3 * n_particles}, got {dim}")
        self.velocity = velocity
        self.dim = dim
        self.n_particles = int(n_particles)
        self.d = dim - 3 if n_particles > 0 else dim
        self.scheme = scheme
        self.n_steps = int(times.numel() - 1)
        self.t: List[float] = [float(v) for v in times]
        self.inverse_tol = float(inverse_tol)
        self.inverse_max_iter = int(inverse_max_iter)
        if inverse_memory < 0:
            raise ValueError(f"inverse_memory must be >= 0, got {inverse_memory}")
        self.inverse_memory = int(inverse_memory)

    # -- velocity and one explicit step ------------------------------------------------------------
    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Mean-free projection of (B, 3N) vectors (identity when n_particles == 0)."""
        if self.n_particles > 0:
            w = v.view(v.shape[0], self.n_particles, 3)
            return (w - w.mean(dim=1, keepdim=True)).view(v.shape[0], self.dim)
        return v

    def vel(self, t: float, y: torch.Tensor) -> torch.Tensor:
        tt = torch.full((1, 1), t, dtype=y.dtype, device=y.device)
        return self.project(self.velocity(tt, y))

    @torch.jit.export
    def increment(self, t: float, h: float, y: torch.Tensor) -> torch.Tensor:
        """Psi(y): the scheme's average slope for a step of size h (may be negative) from time t."""
        k1 = self.vel(t, y)
        if self.scheme == "euler":
            return k1
        if self.scheme == "midpoint":
            return self.vel(t + 0.5 * h, y + 0.5 * h * k1)
        k2 = self.vel(t + 0.5 * h, y + 0.5 * h * k1)
        k3 = self.vel(t + 0.5 * h, y + 0.5 * h * k2)
        k4 = self.vel(t + h, y + h * k3)
        return (k1 + 2.0 * k2 + 2.0 * k3 + k4) / 6.0

    @torch.jit.export
    def step(self, k: int, y: torch.Tensor) -> torch.Tensor:
        """Phi_k: from time t_k to t_{k+1} (k = 0 .. K-1)."""
        h = self.t[k + 1] - self.t[k]
        return y + h * self.increment(self.t[k], h, y)

    @torch.jit.export
    def reverse_step(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Fast approximate inverse of Phi_k: one step of the same scheme backwards in time.
        Local error O(h^(p+1)); NOT the exact inverse of the discrete map."""
        h = self.t[k + 1] - self.t[k]
        return x - h * self.increment(self.t[k + 1], -h, x)

    @torch.jit.export
    def inverse_step(self, k: int, x: torch.Tensor, exact: bool = True,
                     guess: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Phi_k^{-1}(x). ``exact=True``: solve y = g(y) := x - h Psi(y) from ``guess`` (default:
        :meth:`reverse_step`) by Anderson-accelerated iteration (depth ``inverse_memory``) until the
        residual max|g(y) - y| / (1 + max|x|) <= ``inverse_tol``; returns g(y) of the last iterate.
        At the iteration cap the returned point's residual is checked once more: rows above
        1e3 ``inverse_tol`` (or not finite) become NaN, so no unchecked extrapolation is returned.
        ``exact=False``: :meth:`reverse_step` alone."""
        if guess is None:
            y = self.reverse_step(k, x)
        else:
            y = guess
        if not exact:
            return y
        h = self.t[k + 1] - self.t[k]
        scale = 1.0 + x.abs().amax(dim=1)
        err = torch.full_like(scale, float("inf"))
        B, D, m = x.shape[0], x.shape[1], self.inverse_memory
        dF = torch.zeros(B, m, D, dtype=x.dtype, device=x.device)  # residual differences, ring buffer
        dG = torch.zeros(B, m, D, dtype=x.dtype, device=x.device)  # image differences
        f_prev = torch.zeros_like(x)
        g_prev = torch.zeros_like(x)
        converged = False
        for it in range(self.inverse_max_iter):
            g = x - h * self.increment(self.t[k], h, y)
            f = g - y
            err = f.abs().amax(dim=1) / scale
            done = (err <= self.inverse_tol) | ~torch.isfinite(err)   # non-finite rows end as NaN below
            if bool(done.all()):
                y = g
                converged = True
                break
            n = min(it, m)
            if n == 0:
                y_next = g
            else:
                slot = (it - 1) % m
                dF[:, slot] = f - f_prev
                dG[:, slot] = g - g_prev
                F = dF[:, :n]
                A = F @ F.transpose(1, 2)
                ridge = 1e-12 * A.diagonal(dim1=1, dim2=2).sum(1) + 1e-300
                A = A + ridge.view(B, 1, 1) * torch.eye(n, dtype=x.dtype, device=x.device)
                gamma, info = torch.linalg.solve_ex(A, F @ f.unsqueeze(2))
                ok = (info == 0) & torch.isfinite(gamma).all(dim=1).squeeze(1)
                y_next = g - (dG[:, :n].transpose(1, 2) @ gamma).squeeze(2)
                y_next = torch.where(ok.unsqueeze(1), y_next, g)
            if m > 0:
                f_prev = f
                g_prev = g
            y = torch.where(done.unsqueeze(1), g, y_next)   # converged rows stay put
        if not converged:  # the cap: the last (extrapolated) iterate is returned only if its residual passes
            g = x - h * self.increment(self.t[k], h, y)
            err = (g - y).abs().amax(dim=1) / scale
            y = g
        bad = ~(err <= 1e3 * self.inverse_tol)
        if bool(bad.any()):
            y = torch.where(bad.unsqueeze(1), torch.full_like(y, float("nan")), y)
        return y

    # -- whole map -----------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """y = f(z), shape (B, D)."""
        y = z
        for k in range(self.n_steps):
            y = self.step(k, y)
        return y

    @torch.jit.export
    def trajectory(self, z: torch.Tensor) -> List[torch.Tensor]:
        """[x_0 = z, x_1, ..., x_K]."""
        out = [z]
        y = z
        for k in range(self.n_steps):
            y = self.step(k, y)
            out.append(y)
        return out

    @torch.jit.export
    def inverse(self, y: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """z = f^{-1}(y): the steps inverted in reverse order."""
        z = y
        for k in range(self.n_steps - 1, -1, -1):
            z = self.inverse_step(k, z, exact, None)
        return z
