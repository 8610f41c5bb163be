"""Estimators of the proposal log-density: fp, fp++, jacobian and hutchinson, as TorchScript methods."""
from .module import ESTIMATORS, PerturbedFlowModule

__all__ = ["ESTIMATORS", "PerturbedFlowModule"]
