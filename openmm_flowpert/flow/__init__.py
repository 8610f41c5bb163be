"""The flow: velocity field, time grid, explicit integrator steps, forward map and exact inverse."""
from .cnf import CNF, SCHEMES, time_grid
from .internal import InternalCoordinates, build_zmatrix
from .molecular import (CircularInternal, MarginalInternal, NormalizedInternal, TorusInternal, frame_rotation,
                        haar_rotations)
from .transforms import (TRANSFORMS, Affine, FixedTransform, get_transform, identity_transform, register_transform,
                         transform_from_state)
from .velocity import VelocityMLP, guess_velocity_config, velocity_config, velocity_from_state, with_condition

__all__ = ["CNF", "SCHEMES", "time_grid", "Affine", "VelocityMLP", "InternalCoordinates", "build_zmatrix",
           "NormalizedInternal", "MarginalInternal", "CircularInternal", "TorusInternal", "frame_rotation",
           "haar_rotations", "FixedTransform", "TRANSFORMS", "register_transform", "get_transform",
           "transform_from_state", "identity_transform",
           "velocity_config", "velocity_from_state", "guess_velocity_config", "with_condition"]
