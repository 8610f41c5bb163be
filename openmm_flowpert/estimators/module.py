"""The perturbed flow as one TorchScript module: maps, exact inverse and the log q estimators.

Every method is a pure function of its inputs: the caller passes the latent z and the Gaussian
probe vectors (drawn by :mod:`openmm_flowpert.noise`), so the scripted file runs unchanged from
Python, C++ or openmm-torch, with or without the native noise library.

Conventions (docs/algorithm.md sections 3-5): the flow is prior -> CNF f (flow perturbation applies
here) -> fixed transform T (exact log-det) -> x. For a proposal,

    log q(x) = log p_Z(z) - log|det J_f(z)| - log|det J_T(y)|,     log W = -u(x) - log q(x),

and each estimator replaces log|det J_f| by an estimate whose exponential is unbiased:

    fp         -d log|J_f^-1 u|,           u uniform (one probe set);
    fp++       -d sum_k log|J_k^-1 u_k|,   one independent u_k per integrator step;
    jacobian   exact log|det| of the discrete map (batched vector-Jacobian products);
    hutchinson trace-ODE with Gaussian probes (biased baseline: for benchmarks and negative controls).

J_k^-1 u solves J_k a = u for one explicit step: the fast variant takes the derivative of the
reverse step (one step of the scheme backwards, O(h^(p+1)) error); the exact variant refines it
by Newton iterations on the discrete map's own Jacobian, to the finite-difference floor. All
directional derivatives are float64 central differences. d is the dimension the CNF lives in
(3N - 3 when mean-free).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flow.cnf import CNF
from .math import log_norm, log_prior, split_pm, unit, wrap_angles

ESTIMATORS = ("fp", "fp++", "jacobian", "hutchinson")


class PerturbedFlowModule(nn.Module):
    """TorchScript-compatible flow with its estimators (see the module docstring).

    Parameters
    ----------
    cnf : CNF
        The discrete flow map in the CNF's coordinates (dimension D, effective dimension d).
    transform : nn.Module
        Fixed bijection y -> x with ``forward(y) -> (x, logdet)`` and ``inverse(x) -> (y, logdet)``.
    x_dim : int
        Number of coordinates of x (3N for molecules; D for abstract targets).
    fd_eps : float
        Central-difference step in CNF coordinates (unit scale), float64 arithmetic.
    newton_tol, newton_max_iter : float, int
        Relative residual |J_k a - u| / |u| that the exact solve of J_k a = u must reach.
    max_jacobian_rows : int
        Row budget of one batched vector-Jacobian product (memory cap of ``"jacobian"``).
    periodic : sequence of int
        CNF coordinates that are angles (rad; the transform's ``periodic()``): their prior is
        uniform on the circle, and latents from :meth:`inverse` / :meth:`refresh` have them in
        [-pi, pi). The velocity field must be 2 pi-periodic in them.
    """

    def __init__(self, cnf: CNF, transform: nn.Module, x_dim: int, fd_eps: float = 1e-5,
                 newton_tol: float = 1e-8, newton_max_iter: int = 6, max_jacobian_rows: int = 8192,
                 periodic: Sequence[int] = ()):
        super().__init__()
        mask = torch.zeros(cnf.dim, dtype=torch.bool)
        mask[list(periodic)] = True
        self.has_periodic = bool(mask.any())
        self.register_buffer("periodic", mask)
        self.cnf = cnf
        self.transform = transform
        self.dim = cnf.dim
        self.d = cnf.d
        self.x_dim = int(x_dim)
        self.n_particles = cnf.n_particles
        self.n_steps = cnf.n_steps
        self.fd_eps = float(fd_eps)
        self.newton_tol = float(newton_tol)
        self.newton_max_iter = int(newton_max_iter)
        self.max_jacobian_rows = int(max_jacobian_rows)

    # -- maps --------------------------------------------------------------------------------------
    @torch.jit.export
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """x = T(f(z)) for latents z (B, D); returns (B, x_dim)."""
        x, _ = self.transform(self.cnf(z))
        return x

    @torch.jit.export
    def inverse(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """z = f^-1(T^-1(x)); NaN rows where the exact inverse did not converge."""
        y, _ = self.transform.inverse(x)
        return self._wrap(self.cnf.inverse(y, exact))

    def _wrap(self, z: torch.Tensor) -> torch.Tensor:
        return wrap_angles(z, self.periodic) if self.has_periodic else z

    def _log_prior(self, z: torch.Tensor, prior_scale: float) -> torch.Tensor:
        return log_prior(z, prior_scale, self.d, self.periodic if self.has_periodic else None)

    @torch.jit.export
    def n_probe_sets(self, estimator: str, n_probes: int = 1) -> int:
        """How many probe vectors per sample ``log_q`` and ``refresh`` expect."""
        if estimator == "fp":
            return 1
        if estimator == "fp++":
            return self.n_steps
        if estimator == "hutchinson":
            return n_probes
        if estimator == "jacobian":
            return 0
        raise ValueError("unknown estimator " + estimator + "; use fp, fp++, jacobian or hutchinson")

    # -- proposal log-density estimates ------------------------------------------------------------
    @torch.jit.export
    def log_q(self, z: torch.Tensor, probes: torch.Tensor, estimator: str, exact_inverse: bool = True,
              prior_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Proposal x = T(f(z)) and the estimate of log q(x) (nats), one per row.

        ``z``: (B, D) latent (in the mean-free subspace when the flow is); ``probes``: (B, P, D)
        Gaussian vectors, P = ``n_probe_sets(estimator)`` (only their directions matter for fp/fp++).
        """
        P = self.n_probe_sets(estimator, probes.shape[1])
        if probes.shape[1] != P:
            raise ValueError("wrong number of probe sets for this estimator")
        if estimator == "fp":
            y, logdet = self._fp(z, unit(self.cnf.project(probes[:, 0])), exact_inverse)
        elif estimator == "fp++":
            y, logdet = self._fp_pp(z, unit(self._project_sets(probes)), exact_inverse)
        elif estimator == "jacobian":
            y, logdet = self._jacobian(z)
        else:
            y, logdet = self._hutchinson(z, self._project_sets(probes))
        x, logdet_t = self.transform(y)
        return x, self._log_prior(z, prior_scale) - logdet - logdet_t

    @torch.jit.export
    def refresh(self, x: torch.Tensor, probes: torch.Tensor, estimator: str, exact_inverse: bool = True,
                prior_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gibbs refresh of the auxiliary directions given x (docs/algorithm.md section 4).

        For x (B, x_dim): z = f^-1(T^-1(x)) by the (exact) inverse, and for each probe set
        u = J g / |J g| with g the Gaussian ``probes`` (J = J_f for fp, J_k at x_{k-1} for fp++),
        so |J^-1 u| = 1 / |J g^| exactly (g^ = g / |g|). Returns (z, u, log q); u has the shape of
        ``probes``. ``jacobian`` and ``hutchinson`` return u = probes and their usual log q.
        ``exact_inverse=False`` (reverse steps for x -> z) is for diagnostics only: z then does not
        map back to x exactly.
        """
        y, logdet_t = self.transform.inverse(x)
        z = self.cnf.inverse(y, exact_inverse)
        eps = self.fd_eps
        if estimator == "fp":
            g = unit(self.cnf.project(probes[:, 0]))
            yp, ym = split_pm(self.cnf(torch.cat([z + eps * g, z - eps * g], 0)))
            jg = (yp - ym) / (2.0 * eps)
            logdet = self.d * log_norm(jg)
            u = unit(jg).unsqueeze(1)
        elif estimator == "fp++":
            g = unit(self._project_sets(probes))
            B = z.shape[0]
            logdet = torch.zeros(B, dtype=z.dtype, device=z.device)
            us: List[torch.Tensor] = []
            cur = z
            for k in range(self.n_steps):
                gk = g[:, k]
                out = self.cnf.step(k, torch.cat([cur, cur + eps * gk, cur - eps * gk], 0))
                jg = (out[B:2 * B] - out[2 * B:]) / (2.0 * eps)
                logdet = logdet + self.d * log_norm(jg)
                us.append(unit(jg))
                cur = out[:B]
            u = torch.stack(us, 1)
        else:
            u = probes
            if estimator == "jacobian":
                _, logdet = self._jacobian(z)
            else:
                _, logdet = self._hutchinson(z, self._project_sets(probes))
        return self._wrap(z), u, self._log_prior(z, prior_scale) - logdet - logdet_t

    # -- estimators of log|det J_f| ----------------------------------------------------------------
    def _project_sets(self, probes: torch.Tensor) -> torch.Tensor:
        B, P, D = probes.shape[0], probes.shape[1], probes.shape[2]
        return self.cnf.project(probes.reshape(B * P, D)).reshape(B, P, D)

    def _jvp(self, k: int, at: torch.Tensor, v: torch.Tensor, reverse: bool) -> torch.Tensor:
        """Central difference in float64 of Phi_k (or of the reverse step) at ``at`` along ``v``."""
        eps = self.fd_eps
        n = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        vh = v / torch.where(n > 0, n, torch.ones_like(n))
        pair = torch.cat([at + eps * vh, at - eps * vh], 0)
        out = self.cnf.reverse_step(k, pair) if reverse else self.cnf.step(k, pair)
        p, m = split_pm(out)
        return (p - m) * (n / (2.0 * eps))

    def _solve_step(self, k: int, prev: torch.Tensor, cur: torch.Tensor, u: torch.Tensor,
                    exact: bool) -> torch.Tensor:
        """a = J_k^-1 u, with J_k = dPhi_k at prev and cur = Phi_k(prev).

        Fast: a = J_rev u, the derivative of the reverse step at cur (error O(h^(p+1))).
        Exact: Newton iterations on J_k a = u preconditioned by J_rev, a <- a - J_rev (J_k a - u);
        J_rev J_k = I + O(h^(p+1)), so a few iterations usually suffice (cost: docs/benchmarks.md section 1).
        Rows whose relative residual stays above ``newton_tol`` come back as NaN (rejections).
        """
        a = self._jvp(k, cur, u, True)
        if not exact:
            return a
        un = torch.linalg.vector_norm(u, dim=1)
        rel = torch.full_like(un, float("inf"))
        for _ in range(self.newton_max_iter):
            r = self._jvp(k, prev, a, False) - u
            rel = torch.linalg.vector_norm(r, dim=1) / un
            if bool((rel <= self.newton_tol).all()):
                break
            a = a - self._jvp(k, cur, r, True)
        bad = ~(rel <= self.newton_tol)
        if bool(bad.any()):
            a = torch.where(bad.unsqueeze(1), torch.full_like(a, float("nan")), a)
        return a

    def _fp(self, z: torch.Tensor, u: torch.Tensor, exact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Single-step FP: log|det J_f| ~ -d log|J_f^-1 u|, with J_f^-1 u = J_1^-1 ... J_K^-1 u
        carried backwards through the steps as a unit vector and its accumulated log length."""
        traj = self.cnf.trajectory(z)
        a = u
        log_len = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for k in range(self.n_steps - 1, -1, -1):
            a = self._solve_step(k, traj[k], traj[k + 1], a, exact)
            log_len = log_len + log_norm(a)
            a = unit(a)
        return traj[self.n_steps], -self.d * log_len

    def _fp_pp(self, z: torch.Tensor, u: torch.Tensor, exact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """FP++: one probe per step, log|det J_k| ~ -d log|J_k^-1 u_k|."""
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        prev = z
        for k in range(self.n_steps):
            cur = self.cnf.step(k, prev)
            logdet = logdet - self.d * log_norm(self._solve_step(k, prev, cur, u[:, k], exact))
            prev = cur
        return prev, logdet

    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis (D, d) of the subspace the CNF lives in."""
        eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
        if self.n_particles == 0:
            return eye
        proj = self.cnf.project(eye)
        _, vecs = torch.linalg.eigh(proj)
        return vecs[:, 3:]  # eigenvalues (0, 0, 0, 1, ..., 1) in ascending order

    def _jacobian(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact log|det J_f| = sum_k log|det J_k| (restricted to the subspace), brute force."""
        Q = self._basis(z)
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        y = z.detach()
        for k in range(self.n_steps):
            logdet = logdet + self._step_logdet(k, y, Q)
            y = self.cnf.step(k, y).detach()
        return y, logdet

    def _step_logdet(self, k: int, y: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """log|det Q^T J_k Q| from d vector-Jacobian products per sample, batched in chunks."""
        B, D, d = y.shape[0], self.dim, Q.shape[1]
        chunk = max(1, self.max_jacobian_rows // d)
        out: List[torch.Tensor] = []
        qt = Q.t().contiguous()
        for b0 in range(0, B, chunk):
            yb = y[b0:b0 + chunk]
            nb = yb.shape[0]
            prev = torch.is_grad_enabled()
            torch.set_grad_enabled(True)
            rep = yb.unsqueeze(1).expand(nb, d, D).reshape(nb * d, D).detach().requires_grad_(True)
            img = self.cnf.step(k, rep)
            cot = qt.unsqueeze(0).expand(nb, d, D).reshape(nb * d, D)
            cots: List[Optional[torch.Tensor]] = [cot]
            grads = torch.autograd.grad([img], [rep], cots)
            torch.set_grad_enabled(prev)
            g = grads[0]
            assert g is not None
            rows = g.reshape(nb, d, D)
            mat = rows if self.n_particles == 0 else torch.matmul(rows, Q)
            out.append(torch.linalg.slogdet(mat)[1])
        return torch.cat(out, 0)

    def _vel_div(self, t: float, y: torch.Tensor, e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """v(t, y) and the Hutchinson divergence mean_n e_n^T (dv/dy) e_n for probes e (B, N, D)."""
        N = e.shape[1]
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        yy = y.detach().requires_grad_(True)
        v = self.cnf.vel(t, yy)
        div = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        for n in range(N):
            en = e[:, n]
            ens: List[Optional[torch.Tensor]] = [en]
            grads = torch.autograd.grad([v], [yy], ens, retain_graph=n < N - 1)
            gn = grads[0]
            assert gn is not None
            div = div + (gn * en).sum(1)
        torch.set_grad_enabled(prev)
        return v.detach(), div.detach() / N

    def _hutchinson(self, z: torch.Tensor, e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """RK4 on the augmented ODE (y, log det) with Hutchinson traces at every stage point."""
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        y = z.detach()
        t = self.cnf.t
        for k in range(self.n_steps):
            h = t[k + 1] - t[k]
            k1, d1 = self._vel_div(t[k], y, e)
            k2, d2 = self._vel_div(t[k] + 0.5 * h, y + 0.5 * h * k1, e)
            k3, d3 = self._vel_div(t[k] + 0.5 * h, y + 0.5 * h * k2, e)
            k4, d4 = self._vel_div(t[k] + h, y + h * k3, e)
            y = y + h * (k1 + 2.0 * k2 + 2.0 * k3 + k4) / 6.0
            logdet = logdet + h * (d1 + 2.0 * d2 + 2.0 * d3 + d4) / 6.0
        return y, logdet
