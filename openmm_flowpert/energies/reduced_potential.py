"""Batched reduced potentials u = U / kT from OpenMM, with context reuse and worker threads."""
from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import openmm
from openmm import unit

from .platforms import default_n_workers, platform_candidates, usable_cpus

__all__ = ["ReducedPotential", "as_positions_array", "energy_system", "kT_kJ_per_mol"]

_R = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)


def _kelvin(temperature) -> float:
    if unit.is_quantity(temperature):
        return float(temperature.value_in_unit(unit.kelvin))
    return float(temperature)


def kT_kJ_per_mol(temperature) -> float:
    """kT = R T in kJ/mol for a temperature (openmm Quantity, or float in K)."""
    return _R * _kelvin(temperature)


def energy_system(system: openmm.System) -> openmm.System:
    """A copy of ``system`` without its thermostats, for contexts that only evaluate energies.

    An ``AndersenThermostat`` adds no energy, but creating a context that holds one reseeds
    OpenMM's process-wide random generator on the Reference platform (from the clock when its seed
    is 0, as in the systems of openmmtools' NVT ``ThermodynamicState.system``), which the Langevin
    integrators of the same process draw from: MD after such a context could not be repeated.
    """
    out = copy.deepcopy(system)
    for i in reversed(range(out.getNumForces())):
        if isinstance(out.getForce(i), openmm.AndersenThermostat):
            out.removeForce(i)
    return out


def as_positions_array(positions, n_atoms: int) -> np.ndarray:
    """Positions as a float64 array (B, N, 3) in nm.

    Accepts numpy arrays, torch tensors, nested lists or openmm Quantities of shape (B, N, 3),
    (B, 3N) or a single configuration (N, 3) (returned as B = 1). Unitless input is taken as nm.
    """
    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.nanometer)
    if hasattr(positions, "detach"):  # torch tensor
        positions = positions.detach().cpu().numpy()
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim == 3 and x.shape[1:] == (n_atoms, 3):
        return x
    if x.ndim == 2 and x.shape[1] == 3 * n_atoms:
        return x.reshape(x.shape[0], n_atoms, 3)
    if x.ndim == 2 and x.shape == (n_atoms, 3):
        return x[None]
    raise ValueError(f"positions of shape {x.shape} do not fit a system of {n_atoms} atoms; expected "
                     f"(B, {n_atoms}, 3), (B, {3 * n_atoms}) or ({n_atoms}, 3), in nm")


class ReducedPotential:
    """Reduced potentials u = U / kT of batches of configurations.

    Parameters
    ----------
    system : openmm.System
        The system (copied, without thermostats: :func:`energy_system`). Validate it for flow moves
        with :func:`check_system`; this class evaluates energies of any system (periodic ones at
        their default box).
    temperature : openmm Quantity or float
        Temperature (float: K). kT = MOLAR_GAS_CONSTANT_R * T.
    platform : str or openmm.Platform, optional
        OpenMM platform. Default: CUDA, then OpenCL, then CPU/Reference (Reference first below
        50 atoms, see :mod:`.platforms`); a platform that fails to create a context is skipped.
    n_workers : int, optional
        Worker threads, each with its own lazily created Context; a batch is split into contiguous
        chunks, one per worker. Default (:func:`.platforms.default_n_workers`): 1 on GPU platforms
        and on Reference below 50 atoms, the usable CPU count otherwise.
    platform_properties : dict, optional
        Passed to every Context. On the CPU platform with several workers, ``Threads`` defaults to
        ``cpus // n_workers``.

    Notes
    -----
    Calls are serialized by a lock (one batch at a time). Non-finite energies and any exception
    raised by OpenMM for one configuration (e.g. NaN positions on the CPU platform) give +inf.
    The object pickles as (system XML, temperature, platform choice, properties, n_workers); the
    contexts are rebuilt lazily after unpickling.

    Examples
    --------
    >>> rp = ReducedPotential(system, 300 * unit.kelvin)      # doctest: +SKIP
    >>> u = rp(x)              # x: (B, N, 3) in nm -> u: (B,) float64 in kT
    """

    def __init__(self, system: openmm.System, temperature,
                 platform: Union[None, str, openmm.Platform] = None, n_workers: Optional[int] = None,
                 platform_properties: Optional[Dict[str, str]] = None):
        self._setup(energy_system(system), _kelvin(temperature),
                    None if platform is None else platform_candidates(0, platform)[0],
                    n_workers, platform_properties)

    def _setup(self, system, temperature_K, platform_name, n_workers, platform_properties):
        self.system = system
        self.n_atoms = system.getNumParticles()
        self.temperature_K = float(temperature_K)
        self.kT = _R * self.temperature_K  # kJ/mol
        self._requested_platform = platform_name
        self.platform_properties = {str(k): str(v) for k, v in (platform_properties or {}).items()}
        if n_workers is not None and int(n_workers) < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self._requested_n_workers = None if n_workers is None else int(n_workers)
        self.platform_name: Optional[str] = None  # resolved at the first call
        self.n_workers: Optional[int] = self._requested_n_workers
        self._contexts: List[Optional[openmm.Context]] = []
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    @classmethod
    def from_thermodynamic_state(cls, state, platform: Union[None, str, openmm.Platform] = None,
                                 n_workers: Optional[int] = None,
                                 platform_properties: Optional[Dict[str, str]] = None) -> "ReducedPotential":
        """Build from an openmmtools ``ThermodynamicState`` (NVT only): u = U / kT, matching
        ``state.reduced_potential`` without a pressure term."""
        if getattr(state, "pressure", None) is not None:
            raise ValueError("NPT thermodynamic states (pressure set) are not supported; "
                             "use an NVT state of a non-periodic system")
        return cls(state.system, state.temperature, platform=platform, n_workers=n_workers,
                   platform_properties=platform_properties)

    # ------------------------------------------------------------------ contexts
    def _properties(self, name: str) -> Dict[str, str]:
        props = dict(self.platform_properties)
        if name == "CPU" and "Threads" not in props and self.n_workers and self.n_workers > 1:
            props["Threads"] = str(max(1, usable_cpus() // self.n_workers))
        return props

    def _new_context(self, name: str) -> openmm.Context:
        return openmm.Context(self.system, openmm.VerletIntegrator(1.0 * unit.femtosecond),
                              openmm.Platform.getPlatformByName(name), self._properties(name))

    def _resolve(self) -> None:
        """Choose the platform (creating the first context) and the worker count."""
        errors = []
        for name in platform_candidates(self.n_atoms, self._requested_platform):
            if self._requested_n_workers is None:
                self.n_workers = default_n_workers(name, self.n_atoms)
            try:
                ctx = self._new_context(name)
            except Exception as exc:  # a registered platform without a usable device
                if self._requested_platform is not None:
                    raise
                errors.append(f"{name}: {exc}")
                continue
            self.platform_name = name
            self._contexts = [ctx] + [None] * (self.n_workers - 1)
            return
        raise RuntimeError("no OpenMM platform could create a context: " + "; ".join(errors))

    def _context(self, k: int) -> openmm.Context:
        if self._contexts[k] is None:
            self._contexts[k] = self._new_context(self.platform_name)
        return self._contexts[k]

    # ------------------------------------------------------------------ evaluation
    def _evaluate_chunk(self, k: int, x: np.ndarray, forces: bool = False):
        ctx = self._context(k)
        out = np.empty(len(x), dtype=np.float64)
        f = np.zeros(x.shape, dtype=np.float64) if forces else None
        for i, xi in enumerate(x):
            try:
                ctx.setPositions(xi)
                state = ctx.getState(getEnergy=True, getForces=forces)
                out[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                if forces:
                    f[i] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
            except Exception:  # OpenMM refuses this configuration (e.g. NaN coordinates)
                out[i] = np.inf
        return out if f is None else (out, f)

    def _evaluate(self, x: np.ndarray, forces: bool):
        with self._lock:
            if self.platform_name is None:
                self._resolve()
            n_used = min(self.n_workers, len(x))
            if n_used <= 1:
                return self._evaluate_chunk(0, x, forces)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.n_workers, thread_name_prefix="ReducedPotential")
            chunks = np.array_split(x, n_used)
            parts = list(self._executor.map(self._evaluate_chunk, range(n_used), chunks, [forces] * n_used))
        if not forces:
            return np.concatenate(parts)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def potential_energies(self, positions) -> np.ndarray:
        """Potential energies U (float64, shape (B,)) in kJ/mol of positions in nm.

        ``positions``: (B, N, 3), (B, 3N) or one (N, 3) (then B = 1); numpy, torch or Quantity.
        Per-configuration OpenMM errors give +inf.
        """
        return self._evaluate(as_positions_array(positions, self.n_atoms), forces=False)

    def reduced_energies_and_gradients(self, positions) -> Tuple[np.ndarray, np.ndarray]:
        """Reduced potentials u (B,) in kT and their gradients du/dx (B, N, 3) in kT/nm.

        ``positions`` as for :meth:`__call__` (nm). The gradient is -F / kT with OpenMM's forces F
        (kJ/mol/nm). Non-finite energies and OpenMM errors give u = +inf and a zero gradient.
        """
        u, f = self._evaluate(as_positions_array(positions, self.n_atoms), forces=True)
        u = u / self.kT
        bad = ~np.isfinite(u) | ~np.isfinite(f).all(axis=(1, 2))
        u[bad] = np.inf
        f[bad] = 0.0
        return u, -f / self.kT

    def __call__(self, positions, temperature=None) -> np.ndarray:
        """Reduced potentials u = U / kT (float64, shape (B,), kT) of positions in nm.

        ``positions``: (B, N, 3), (B, 3N) or one (N, 3) (then B = 1); numpy, torch or Quantity.
        ``temperature`` (openmm Quantity or float in K) overrides the object's own: the same
        energies reduced at another state of a temperature ladder. Non-finite energies and
        per-configuration OpenMM errors give +inf.
        """
        kT = self.kT if temperature is None else kT_kJ_per_mol(temperature)
        u = self.potential_energies(positions) / kT
        u[~np.isfinite(u)] = np.inf
        return u

    # ------------------------------------------------------------------ lifetime, pickling
    def close(self) -> None:
        """Shut down the worker threads and free the contexts (they are rebuilt on the next call)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._contexts = []
            self.platform_name = None
            self.n_workers = self._requested_n_workers

    def __enter__(self) -> "ReducedPotential":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"system_xml": openmm.XmlSerializer.serialize(self.system),
                "temperature_K": self.temperature_K, "platform": self._requested_platform,
                "n_workers": self._requested_n_workers, "platform_properties": self.platform_properties}

    def __setstate__(self, state: dict) -> None:
        self._setup(openmm.XmlSerializer.deserialize(state["system_xml"]), state["temperature_K"],
                    state["platform"], state["n_workers"], state["platform_properties"])

    def __repr__(self) -> str:
        return (f"ReducedPotential(n_atoms={self.n_atoms}, T={self.temperature_K} K, "
                f"platform={self.platform_name or self._requested_platform or 'auto'}, "
                f"n_workers={self.n_workers or 'auto'})")
