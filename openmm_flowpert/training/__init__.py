"""Training flows by flow matching on sample arrays."""
from .flow_matching import train_flow

__all__ = ["train_flow"]
