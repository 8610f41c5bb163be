"""Energy layer: OpenMM reduced potentials u = U/kT for batches of positions (nm).

Knows nothing about flows. ``ReducedPotential`` evaluates batches with reused contexts and worker
threads; ``check_system`` rejects systems that flow moves cannot sample.
"""
from .checks import check_system, is_rotation_invariant, is_translation_invariant, translation_invariance_by_force_types
from .platforms import SMALL_SYSTEM_ATOMS, available_platforms, default_n_workers, platform_candidates
from .reduced_potential import ReducedPotential, as_positions_array, energy_system, kT_kJ_per_mol

__all__ = ["ReducedPotential", "check_system", "is_rotation_invariant", "is_translation_invariant",
           "translation_invariance_by_force_types", "as_positions_array", "energy_system", "kT_kJ_per_mol",
           "available_platforms", "platform_candidates", "default_n_workers", "SMALL_SYSTEM_ATOMS"]
