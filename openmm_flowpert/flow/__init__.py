"""The flow: velocity field, time grid, explicit integrator steps, forward map and exact inverse."""
from .cnf import CNF, SCHEMES, time_grid
from .internal import InternalCoordinates, build_zmatrix
from .molecular import NormalizedInternal, frame_rotation, haar_rotations
from .transforms import Affine
from .velocity import VelocityMLP

__all__ = ["CNF", "SCHEMES", "time_grid", "Affine", "VelocityMLP", "InternalCoordinates", "build_zmatrix",
           "NormalizedInternal", "frame_rotation", "haar_rotations"]
