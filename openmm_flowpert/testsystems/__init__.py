"""Built-in target systems with exactly known reference observables."""
from .chain import TorsionChain
from .gmm import GaussianMixtureTarget
from .gmm_field import GaussianMixtureField
from .gmm_openmm import GaussianMixture

__all__ = ["GaussianMixtureTarget", "GaussianMixtureField", "GaussianMixture", "TorsionChain"]
