"""Training flows by flow matching on sample arrays: :func:`train_flow` and its parts;
:func:`refine_by_importance` (continued training on the flow's own proposals resampled by W) and
:func:`fine_tune_reverse_kl` (the reverse divergence on OpenMM energies and forces, mixed with likelihood)."""
from .config import DEFAULTS, TrainingConfig
from .data import TrainingData, prepare_data
from .flow_matching import train_flow
from .importance import refine_by_importance
from .reverse_kl import fine_tune_reverse_kl
from .trainer import FlowTrainer, load_checkpoint, save_checkpoint
from .validation import energy_validation

__all__ = ["train_flow", "refine_by_importance", "fine_tune_reverse_kl", "TrainingConfig", "DEFAULTS", "TrainingData",
           "prepare_data", "FlowTrainer", "save_checkpoint", "load_checkpoint", "energy_validation"]
