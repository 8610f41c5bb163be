"""The two-well Gaussian mixture of the flow-perturbation paper (docs/algorithm.md section 8).

Pure torch: the energy (reduced units, kT) and exact samples. The OpenMM version of the same
target (a ``TorchForce``) builds on this class.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["GaussianMixtureTarget"]


class GaussianMixtureTarget:
    """Two Gaussian wells at ``-separation * e_0`` and ``+separation * e_0``.

    Parameters
    ----------
    dim : int
        Dimension d of the target.
    weights : (float, float)
        Well weights; the paper's (1/4, 3/4).
    separation : float
        Distance of each mean from the origin along e_0.
    seed : int
        Seed of the covariances: diagonal eigenvalues 0.01 + |N(0, 0.25^2)|, rotated by a random
        orthogonal matrix (a different one per well).

    The density is normalized, so ``energy(x) = -log p(x)`` is a reduced potential with log Z = 0.

    Examples
    --------
    >>> gmm = GaussianMixtureTarget(dim=10)
    >>> x = gmm.sample(1000, seed=0)
    >>> gmm.exact_fraction_left
    0.25
    """

    def __init__(self, dim: int = 10, weights: Sequence[float] = (0.25, 0.75), separation: float = 2.0,
                 seed: int = 0):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
        if w.numel() != 2 or (w <= 0).any():
            raise ValueError(f"weights must be two positive numbers, got {weights}")
        self.dim = int(dim)
        self.weights = w / w.sum()
        self.separation = float(separation)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        means = torch.zeros(2, dim, dtype=torch.float64)
        means[0, 0], means[1, 0] = -separation, separation
        eig = 0.01 + (0.25 * torch.randn(2, dim, generator=gen, dtype=torch.float64)).abs()
        rot = torch.linalg.qr(torch.randn(2, dim, dim, generator=gen, dtype=torch.float64))[0]
        self.means = means
        self.eigenvalues = eig
        self.rotations = rot  # covariance_j = R_j diag(eig_j) R_j^T
        self.covariances = rot @ torch.diag_embed(eig) @ rot.transpose(1, 2)

    @property
    def exact_fraction_left(self) -> float:
        """Exact probability of x_0 < 0 (the weight of the left well, up to exponentially small tails)."""
        return float(self._fraction_left())

    def _fraction_left(self) -> torch.Tensor:
        # P(x_0 < 0) = sum_j w_j Phi(-mu_j0 / sigma_j0) with sigma_j0^2 = Sigma_j[0, 0]
        sd = self.covariances[:, 0, 0].sqrt()
        return (self.weights * 0.5 * torch.erfc((self.means[:, 0] / sd) / math.sqrt(2.0))).sum()

    def log_prob_components(self, x: torch.Tensor) -> torch.Tensor:
        """log w_j + log N(x; mu_j, Sigma_j) for both wells, shape (n, 2). ``x``: (n, dim)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        out = []
        for j in range(2):
            y = (x - self.means[j]) @ self.rotations[j]          # coordinates in the eigenbasis
            quad = (y * y / self.eigenvalues[j]).sum(-1)
            logdet = self.eigenvalues[j].log().sum()
            out.append(self.weights[j].log() - 0.5 * (quad + logdet + self.dim * math.log(2 * math.pi)))
        return torch.stack(out, -1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced potential u(x) = -log p(x) in kT, shape (n,). ``x``: (n, dim)."""
        return -torch.logsumexp(self.log_prob_components(x), -1)

    def sample(self, n: int, seed: int = 0, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Exact iid samples, shape (n, dim), float64. ``weights`` overrides the well weights
        (e.g. (0.5, 0.5) for training data that reweighting must correct)."""
        gen = torch.Generator().manual_seed(int(seed))
        w = self.weights if weights is None else torch.tensor([float(v) for v in weights], dtype=torch.float64)
        comp = torch.multinomial(w / w.sum(), n, replacement=True, generator=gen)
        g = torch.randn(n, self.dim, generator=gen, dtype=torch.float64) * self.eigenvalues[comp].sqrt()
        if self.dim <= 64:
            return self.means[comp] + torch.einsum("nij,nj->ni", self.rotations[comp], g)
        x = torch.empty_like(g)  # large d: one matrix product per well (no (n, d, d) gather)
        for c in range(self.means.shape[0]):
            sel = comp == c
            x[sel] = self.means[c] + g[sel] @ self.rotations[c].T
        return x

    def exact_mean_energy(self, n: int = 400_000, seed: int = 12345) -> tuple:
        """Mean reduced energy under the target by direct sampling: (mean, standard error)."""
        u = self.energy(self.sample(n, seed=seed))
        return float(u.mean()), float(u.std() / math.sqrt(n))
