"""Shared fixtures: small flows built once per test session."""
import math

import openmm_flowpert as fp  # first: it sets OMP_WAIT_POLICY before torch starts its threads

import pytest
import torch

from torch import nn
from openmm_flowpert.flow import CNF, Affine, VelocityMLP, time_grid
from openmm_flowpert.estimators import PerturbedFlowModule
from openmm_flowpert.testsystems import GaussianMixtureTarget

# One torch thread for the whole session: the tests' batches are small, and with 2 threads on the
# 2-core machines they stall on thread synchronization (the SMC tests took 3x longer); the z-scores
# in the docstrings were measured with one thread.
torch.set_num_threads(1)


class AnisotropicVelocity(nn.Module):
    """v(t, y) = A y + tanh-MLP(y): a deliberately anisotropic flow (log singular values of the
    flow map spread over about +-1) with a nonlinear part, for the estimator tests."""

    def __init__(self, dim: int, seed: int = 0, strength: float = 1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        rot = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
        eig = torch.linspace(-strength, strength, dim, dtype=torch.float64)
        self.register_buffer("A", rot @ torch.diag(eig) @ rot.T)
        self.mlp = VelocityMLP(dim, hidden=16, n_layers=2).double()
        for p in self.mlp.parameters():
            p.requires_grad_(False)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A.T + 0.3 * torch.tanh(self.mlp(t, y))


def make_module(dim: int, n_particles: int = 0, n_steps: int = 6, seed: int = 0, strength: float = 1.0):
    """A scripted PerturbedFlowModule with an anisotropic flow and a non-trivial affine transform."""
    torch.manual_seed(seed)
    vel = AnisotropicVelocity(dim, seed=seed, strength=strength)
    cnf = CNF(vel, time_grid(n_steps, "uniform"), n_particles=n_particles)
    gen = torch.Generator().manual_seed(seed + 7)
    shift = torch.randn(dim, generator=gen, dtype=torch.float64)
    scale = torch.tensor([1.7]) if n_particles else 0.5 + torch.rand(dim, generator=gen, dtype=torch.float64)
    transform = Affine(shift, scale, n_particles=n_particles)
    return PerturbedFlowModule(cnf, transform, dim)


# Short training runs: a faster schedule than the defaults (which suit hundreds of epochs on molecular
# data); the statistical tests' sizes and margins were measured with these flows.
SHORT_RUN = dict(lr=2e-3, ema=0.995, patience=20)


@pytest.fixture(scope="session")
def gmm():
    return GaussianMixtureTarget(dim=10)


@pytest.fixture(scope="session")
def gmm_flow(gmm):
    """A small flow trained on 50/50 exact samples of the 10-D GMM (reweighting must recover 1/4)."""
    samples = gmm.sample(12000, seed=1, weights=(0.5, 0.5))
    return fp.train_flow(samples, epochs=40, hidden=64, n_layers=3, n_steps=16, progress=False, seed=0,
                         **SHORT_RUN)


def standard_error_of_chain_means(values: torch.Tensor) -> tuple:
    """Mean and standard error over independent chains: values (n_samples, n_chains).

    Each chain's time average carries its own autocorrelation, so the spread of the chain means
    is an autocorrelation-corrected standard error."""
    means = values.double().mean(0)
    return float(means.mean()), float(means.std() / math.sqrt(means.numel()))


def z_of_chain_means(chain_means: torch.Tensor, exact: float) -> float:
    """z = (mean - exact) / SE of independent chains' time averages (chain_means (n_chains,))."""
    return float((chain_means.mean() - exact) / (chain_means.std() / math.sqrt(chain_means.numel())))


class WideRedrawNoise:
    """Noise whose partial redraws (latent-local proposals) draw from N(0, sigma^2) instead of N(0, 1);
    every other draw is the wrapped Noise's. The negative control of the latent-proposal tests: that
    kernel is reversible with respect to N(0, sigma^2 I), not the prior."""

    def __init__(self, noise, sigma):
        self._noise, self._sigma = noise, sigma

    def __getattr__(self, name):
        return getattr(self._noise, name)

    def partial_redraw(self, w, k, n_particles=0):
        new, _ = self._noise.partial_redraw(w, k)
        assert n_particles == 0  # the GMM flows are not mean-free
        return torch.where(new != w, self._sigma * new, w), None


@pytest.fixture(scope="session")
def gmm_system():
    """The 12-D two-well GMM as an OpenMM System (openmm-torch); not translation invariant."""
    from openmm_flowpert.testsystems import GaussianMixture

    return GaussianMixture(n_particles=4)


@pytest.fixture(scope="session")
def gmm_system_flow(gmm_system, tmp_path_factory):
    """Trained on 50/50 exact samples: moves must reweight to the exact 1/4 : 3/4."""
    x = torch.as_tensor(gmm_system.target.sample(12000, seed=1, weights=(0.5, 0.5))).reshape(-1, 4, 3)
    flow = fp.train_flow(x * gmm_system.length_scale, remove_com=False, epochs=30, hidden=64, n_layers=3,
                         n_steps=12, progress=False, temperature=300.0, seed=0, **SHORT_RUN)
    flow.save(tmp_path_factory.mktemp("flows") / "gmm12.pt")
    return flow
