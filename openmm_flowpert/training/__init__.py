"""Training flows by flow matching on sample arrays: :func:`train_flow` and its parts."""
from .config import DEFAULTS, TrainingConfig
from .data import TrainingData, prepare_data
from .flow_matching import train_flow
from .trainer import FlowTrainer, load_checkpoint, save_checkpoint
from .validation import energy_validation

__all__ = ["train_flow", "TrainingConfig", "DEFAULTS", "TrainingData", "prepare_data", "FlowTrainer",
           "save_checkpoint", "load_checkpoint", "energy_validation"]
