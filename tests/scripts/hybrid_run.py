"""A short seeded hybrid MD + flow-move run of alanine dipeptide (Reference platform); saves the
trajectory's positions (nm, float64, (4, 22, 3)) to OUT.npy.

usage: python hybrid_run.py OUT.npy
"""
import sys

import numpy as np


def positions() -> np.ndarray:
    from openmm_flowpert.samplers.hybrid import run_hybrid
    from openmm_flowpert.systems import alanine_dipeptide, bundled_flow

    ms = alanine_dipeptide("vacuum")
    r = run_hybrid(ms.system, ms.positions, 300.0, bundled_flow("alanine-dipeptide"), n_iterations=4,
                   md_steps=20, n_proposals=4, seed=5, platform="Reference", progress=False)
    return r.positions


if __name__ == "__main__":
    np.save(sys.argv[1], positions())
