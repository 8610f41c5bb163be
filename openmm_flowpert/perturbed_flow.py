"""`PerturbedFlow`: a trained flow, its estimators and its file format, in one Python object.

The heavy lifting happens in a TorchScript :class:`~openmm_flowpert.estimators.PerturbedFlowModule`;
this class adds the noise (from :mod:`openmm_flowpert.noise`), shapes, defaults, and save/load.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import noise as _noise
from ._files import atomic_write
from .estimators import ESTIMATORS, PerturbedFlowModule
from .estimators.math import angle_from_normal, wrap_angle
from .flow import (CNF, frame_rotation, guess_velocity_config, haar_rotations, identity_transform,
                   transform_from_state, velocity_config, velocity_from_state, with_condition)
from .flow.metadata import FORMAT, FORMAT_VERSION, FlowMetadata

__all__ = ["PerturbedFlow", "Proposal", "FlowFileError", "FlowMetadata", "file_checksum"]

_META = "flowpert.json"

#: Default of ``exact_inverse`` for proposals (see docs/benchmarks.md, "exact vs fast inverse").
DEFAULT_EXACT_INVERSE = True


def _plain_execution():
    """Run scripted methods without TorchScript's profiling optimizer.

    The profiling optimizer re-specializes each new (method, batch shape) combination and a move
    alternates several shapes, so first calls are much slower; in the steady state both run at the
    same speed (docs/benchmarks.md section 1, "TorchScript executor").
    """
    return torch.jit.optimized_execution(False)


class FlowFileError(ValueError):
    """A flow file is missing, truncated, corrupt or not an openmm-flowpert flow."""


def file_checksum(path: str) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compiled_code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the source that :meth:`PerturbedFlow.build` compiles into a flow
    file (the flow and estimator modules); stored in the metadata as ``"code"``."""
    from . import estimators, flow

    h = hashlib.sha256()
    for pkg in (flow, estimators):
        folder = os.path.dirname(pkg.__file__)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as fh:
                    h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


def check_probes(probes: str) -> None:
    """Only Gaussian probes give uniform directions; anything else biases W (docs/algorithm.md section 2)."""
    if probes != "gaussian":
        raise ValueError(
            f"probes={probes!r} is not allowed: flow perturbation is unbiased only for directions uniform "
            "on the sphere, which Gaussian probes give; Rademacher (and other) probes are biased. "
            "Use probes='gaussian'.")


@dataclass
class Proposal:
    """A batch of proposals.

    Attributes
    ----------
    x : Tensor
        Positions, (B, n_atoms, 3) in nm for molecules, (B, D) for abstract targets.
    log_q : Tensor (B,)
        Estimate of log q(x) (nats); log W = -u(x) - log_q with u the reduced potential (kT).
    w : Tensor (B, D)
        Unprojected standard-normal latent; z = prior_scale * P w (P the mean-free projection),
        and z = 2 pi Phi(w) - pi for angle coordinates (:attr:`PerturbedFlow.periodic`).
    eps : Tensor (B, P, D)
        Unprojected Gaussian probe vectors (their directions are the auxiliary u).
    """

    x: torch.Tensor
    log_q: torch.Tensor
    w: torch.Tensor
    eps: torch.Tensor


class PerturbedFlow:
    """A normalizing flow with flow-perturbation estimators of its proposal density.

    Build one with :func:`openmm_flowpert.train_flow` or load one with :meth:`load`.

    Parameters
    ----------
    module : torch.jit.ScriptModule
        A scripted :class:`~openmm_flowpert.estimators.PerturbedFlowModule`.
    metadata : dict
        Plain-JSON metadata (n_atoms, remove_com, d, prior_scale, integrator, n_steps,
        temperature in K or None, units = "nm", ...).

    Examples
    --------
    >>> flow = PerturbedFlow.load("flow.pt")                  # doctest: +SKIP
    >>> prop = flow.propose(64, Noise(seed=0), estimator="fp++")  # doctest: +SKIP
    >>> log_w = -energy(prop.x) - prop.log_q                  # doctest: +SKIP
    """

    def __init__(self, module: torch.jit.ScriptModule, metadata: dict, path: Optional[str] = None):
        self.module = module
        self.metadata = dict(metadata)
        self.path = path  #: the file this flow was loaded from or last saved to
        self.device = torch.device("cpu")  #: where the network runs (see :meth:`to`)
        self._at: dict = {}  # at_temperature's compiled flows, by temperature

    def to(self, device) -> "PerturbedFlow":
        """Run the network on a torch ``device`` (``"cuda"``, ``"cpu"``); returns self.

        The integration, the estimators and the noise of propose / refresh / sample move there (the
        native CUDA kernels draw the same numbers as the CPU; without them the noise is drawn on
        the CPU and copied); every method still takes and returns CPU tensors, so samplers and
        OpenMM energies are unchanged. Meant for large batches (SMC walkers); for the small
        batches of one chain the gain is unmeasured.
        """
        self.device = torch.device(device)
        self.module = self.module.to(self.device)
        for flow in self._at.values():
            flow.to(self.device)
        return self

    def _call(self, method: str, *args):
        """Call a scripted method on the flow's device with CPU tensors in and out."""
        fn = getattr(self.module, method)
        if self.device == torch.device("cpu"):  # ("cpu:0" takes the general path: used in the tests)
            return fn(*args)
        out = fn(*[a.to(self.device) if torch.is_tensor(a) else a for a in args])
        if isinstance(out, tuple):
            return tuple(o.cpu() for o in out)
        return out.cpu()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, velocity: torch.nn.Module, times: torch.Tensor, transform: Optional[torch.nn.Module] = None,
              n_particles: int = 0, scheme: str = "rk4", prior_scale: float = 1.0,
              temperature: Optional[float] = None, extra: Optional[dict] = None,
              n_atoms: Optional[int] = None) -> "PerturbedFlow":
        """Script a flow from a velocity field (converted to float64 and frozen) and a time grid.

        ``n_particles > 0`` makes the CNF mean-free over that many particles; ``n_atoms`` (default:
        ``n_particles``) sets the (B, n_atoms, 3) shape of positions, also for flows that are not
        mean-free (0: flat (B, D) vectors). ``transform`` is a fixed transform of
        :mod:`openmm_flowpert.flow.transforms` (default: the identity); it says what it needs and
        implies (:meth:`~openmm_flowpert.flow.FixedTransform.flow_layout`). A
        :class:`~openmm_flowpert.flow.NormalizedInternal` transform makes a molecular flow in
        internal coordinates: the CNF then works in 3N - 6 dimensions (``n_particles`` must be 0),
        positions are mean-free and the orientation of each proposal is drawn from the Haar
        measure (or taken from a reference, see :meth:`evaluate`). ``extra``: further metadata
        entries. The metadata records the velocity network's sizes (a
        :class:`~openmm_flowpert.flow.VelocityMLP`), the transform and the active noise backend.
        """
        velocity = velocity.double().eval()
        for p in velocity.parameters():
            p.requires_grad_(False)
        cnf = CNF(velocity, times, n_particles=n_particles, scheme=scheme)
        if transform is None:
            transform = identity_transform(cnf.dim, n_particles)
        layout = transform.flow_layout(cnf.dim, n_particles)
        periodic = transform.periodic()
        module = torch.jit.script(PerturbedFlowModule(cnf, transform.double(), x_dim=layout["x_dim"],
                                                      periodic=periodic))
        if "n_atoms" in layout:
            n_atoms = layout["n_atoms"]
        rec = FlowMetadata(
            n_atoms=int(n_particles if n_atoms is None else n_atoms),
            remove_com=bool(n_particles > 0 or layout["mean_free"]), latent_particles=int(n_particles),
            dim=cnf.dim, d=cnf.d, x_dim=int(layout["x_dim"]), prior_scale=float(prior_scale), integrator=scheme,
            n_steps=cnf.n_steps, times=[float(t) for t in times], temperature=temperature,
            coordinates=layout["coordinates"], inverse_memory=cnf.inverse_memory, code=compiled_code_fingerprint(),
            orientation=layout.get("orientation"), frame=layout.get("frame"), zmatrix=layout.get("zmatrix"),
            velocity=velocity_config(velocity), transform=transform.spec(), noise_backend=_noise.backend(),
            periodic=list(periodic) or None)
        meta = rec.to_json()
        meta.update(extra or {})
        return cls(module, meta)

    def rescripted(self) -> "PerturbedFlow":
        """The same flow (weights, transform, time grid, metadata) compiled with this version's code.

        A flow file carries the TorchScript code it was saved with, so improvements to the
        integrator, its inverse or the estimators reach old files only through this call (then
        :meth:`save`). Works for flows made by :func:`~openmm_flowpert.train_flow` (a
        :class:`~openmm_flowpert.flow.VelocityMLP` velocity, whose sizes the metadata records; files
        that predate that record get them from the weights); the forward map is unchanged bit for bit.
        """
        return self.rebuilt()

    def parts(self) -> Tuple[torch.nn.Module, torch.nn.Module]:
        """The velocity field (a float64 :class:`~openmm_flowpert.flow.VelocityMLP`) and the fixed
        transform as plain modules, rebuilt from the compiled file: what :meth:`build` took."""
        sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        vel_sd = {k[len("cnf.velocity."):]: v for k, v in sd.items() if k.startswith("cnf.velocity.")}
        try:
            spec = self.info.velocity or guess_velocity_config(vel_sd)
            velocity = velocity_from_state(spec, vel_sd).double()
            # float64: no weight goes through float32
            velocity.load_state_dict(with_condition(vel_sd, velocity.n_cond, velocity.periodic))
        except (KeyError, RuntimeError) as exc:
            raise ValueError("this flow's velocity field is not a VelocityMLP, so it cannot be re-compiled "
                             "from its file; build it again from its Python module with "
                             f"PerturbedFlow.build ({exc})") from None
        transform = transform_from_state(self.info.transform, {k[len("transform."):]: v for k, v in sd.items()
                                                               if k.startswith("transform.")})
        return velocity, transform

    def rebuilt(self, velocity: Optional[torch.nn.Module] = None,
                times: Optional[torch.Tensor] = None) -> "PerturbedFlow":
        """This flow compiled with this version's code, optionally with another velocity field (same
        sizes and coordinates, e.g. fine-tuned weights) or time grid; transform, prior scale,
        temperature and the other metadata are kept. Unchanged parts give the same map bit for bit."""
        rec = self.info
        old_velocity, transform = self.parts()
        grid = torch.tensor(rec.times, dtype=torch.float64) if times is None else torch.as_tensor(times)
        new = PerturbedFlow.build(old_velocity if velocity is None else velocity, grid, transform,
                                  n_particles=rec.latent_particles, scheme=rec.integrator,
                                  prior_scale=rec.prior_scale, temperature=rec.temperature, n_atoms=rec.n_atoms)
        meta = dict(self.metadata)
        for key in ("inverse_memory", "code", "velocity", "transform", "n_steps", "times"):  # recorded anew
            meta[key] = new.metadata[key]
        return PerturbedFlow(new.module, meta).to(self.device)

    @property
    def conditioned(self) -> bool:
        """True for a temperature-conditioned flow (one file for every temperature: :meth:`at_temperature`)."""
        return bool(self.metadata.get("condition"))

    def at_temperature(self, temperature) -> "PerturbedFlow":
        """This flow at ``temperature`` (K, a number or an OpenMM quantity).

        A temperature-conditioned flow (``train_flow(..., temperatures=...)``) is one velocity field
        v(t, y; log(T / T0)) for a range of temperatures; this returns the ordinary flow of that
        field at T (compiled once per temperature and cached; ``metadata["temperature"]`` is T). Its
        density is an ordinary discrete flow's, so proposals at any T are weighed and accepted
        exactly. An unconditioned flow is returned as it is (the same proposals at every
        temperature).
        """
        if hasattr(temperature, "value_in_unit"):
            from openmm import unit

            temperature = temperature.value_in_unit(unit.kelvin)
        T = float(temperature)
        if not (math.isfinite(T) and T > 0):
            raise ValueError(f"temperature must be a positive number of kelvin, got {temperature}")
        cond = self.metadata.get("condition")
        if not cond or self.metadata.get("temperature") == T:
            return self
        key = round(T, 9)
        if key not in self._at:
            velocity, _ = self.parts()
            velocity.cond.fill_(math.log(T / float(cond["reference_temperature"])))
            flow = self.rebuilt(velocity)
            flow.metadata["temperature"] = T
            self._at[key] = flow
        return self._at[key]

    @property
    def info(self) -> FlowMetadata:
        """The metadata as a typed record (:class:`~openmm_flowpert.flow.metadata.FlowMetadata`)."""
        return FlowMetadata.from_json(self.metadata)

    # -- properties --------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        """Number of atoms (0 for an abstract target)."""
        return int(self.metadata["n_atoms"])

    @property
    def remove_com(self) -> bool:
        """True when the flow lives in the mean-free (centre-of-mass-free) subspace."""
        return bool(self.metadata["remove_com"])

    @property
    def dim(self) -> int:
        """Number of latent coordinates D."""
        return int(self.metadata["dim"])

    @property
    def d(self) -> int:
        """Effective dimension (3N - 3 when mean-free): the exponent in the FP estimators."""
        return int(self.metadata["d"])

    @property
    def n_steps(self) -> int:
        return int(self.metadata["n_steps"])

    @property
    def prior_scale(self) -> float:
        """Default standard deviation s of the latent prior N(0, s^2 I)."""
        return float(self.metadata["prior_scale"])

    @property
    def coordinates(self) -> str:
        """``"cartesian"`` or ``"internal"`` (the CNF works in normalized internal coordinates)."""
        return str(self.metadata.get("coordinates", "cartesian"))

    @property
    def _mean_free_atoms(self) -> int:
        """Particles of the mean-free projection of positions (0 when they are not mean-free)."""
        return self.n_atoms if self.remove_com else 0

    @property
    def _latent_mean_free_atoms(self) -> int:
        """Particles of the mean-free projection of the latent space (0 when it is plain)."""
        return int(self.metadata.get("latent_particles", self._mean_free_atoms))

    def _orient(self, x: torch.Tensor, reference, noise: Optional[_noise.Noise]) -> torch.Tensor:
        """Rotate canonical-frame proposals of an internal-coordinate flow (no-op otherwise).

        With ``reference`` positions (B or 1, N, 3) the proposals take the orientation of the
        reference's Z-matrix frame; otherwise a Haar-random rotation from ``noise`` (or none).
        """
        if self.metadata.get("orientation") != "haar":
            return x
        B = x.shape[0]
        p = x.reshape(B, self.n_atoms, 3)
        frame = tuple(self.metadata["frame"])
        if reference is not None:
            ref = self._flat(reference).reshape(-1, self.n_atoms, 3)
            R = frame_rotation(ref, frame).expand(B, 3, 3)
        elif noise is not None:
            R = haar_rotations(noise.gaussian(B, 4))
        else:
            return x
        return torch.einsum("bij,bnj->bni", R, p).reshape(B, -1)

    # -- shapes ------------------------------------------------------------------------------------
    def _flat(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        if self.n_atoms > 0:
            if x.dim() == 2 and x.shape == (self.n_atoms, 3):
                x = x.unsqueeze(0)
            if x.dim() == 3:
                if x.shape[1:] != (self.n_atoms, 3):
                    raise ValueError(f"positions have shape {tuple(x.shape)}; this flow was trained for "
                                     f"{self.n_atoms} atoms, i.e. (batch, {self.n_atoms}, 3) in nm")
                x = x.reshape(x.shape[0], -1)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.shape[-1] != int(self.metadata["x_dim"]):
            raise ValueError(f"positions have {x.shape[-1]} coordinates per sample; the flow expects "
                             f"{self.metadata['x_dim']}")
        return _noise.project_mean_free(x, self._mean_free_atoms)

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.n_atoms, 3) if self.n_atoms > 0 else x

    def _resolve(self, estimator: str, exact_inverse: Optional[bool], prior_scale: Optional[float],
                 probes: str) -> Tuple[bool, float]:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")
        check_probes(probes)
        exact = DEFAULT_EXACT_INVERSE if exact_inverse is None else bool(exact_inverse)
        s = self.prior_scale if prior_scale is None else float(prior_scale)
        if not s > 0:
            raise ValueError(f"prior_scale must be positive, got {s}")
        return exact, s

    @property
    def periodic(self) -> list:
        """Latent coordinates that are angles on the circle (uniform prior); empty for most flows."""
        return list(self.metadata.get("periodic") or [])

    def latent(self, w: torch.Tensor, prior_scale: Optional[float] = None) -> torch.Tensor:
        """z = s P w: the latent for an unprojected standard-normal state w (B, D); angle
        coordinates (:attr:`periodic`) get z = 2 pi Phi(w) - pi, uniform on the circle."""
        s = self.prior_scale if prior_scale is None else float(prior_scale)
        z = s * _noise.project_mean_free(w, self._latent_mean_free_atoms)
        per = self.periodic
        if per:
            z[:, per] = angle_from_normal(w[:, per])
        return z

    def _standard_normal_state(self, z: torch.Tensor, s: float) -> torch.Tensor:
        """The inverse of :meth:`latent` on the latent subspace: w = z / s, and
        w = Phi^-1((z + pi) / (2 pi)) for angle coordinates (z in [-pi, pi))."""
        w = z / s
        per = self.periodic
        if per:
            u = ((z[:, per] + math.pi) / (2.0 * math.pi)).clamp(1e-300, 1.0 - 1e-16)
            w[:, per] = torch.special.ndtri(u)
        return w

    def wrap_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) with the angle coordinates wrapped into [-pi, pi) (e.g. a difference of latents)."""
        per = self.periodic
        if not per:
            return z
        z = z.clone()
        z[:, per] = wrap_angle(z[:, per])
        return z

    # -- sampling and estimates --------------------------------------------------------------------
    def n_probe_sets(self, estimator: str, n_probes: int = 1) -> int:
        """Probe vectors per sample: 1 for fp, n_steps for fp++, n_probes for hutchinson, 0 for jacobian."""
        return int(self.module.n_probe_sets(estimator, n_probes))

    @torch.no_grad()
    def evaluate(self, w: torch.Tensor, eps: torch.Tensor, estimator: str = "fp++",
                 exact_inverse: Optional[bool] = None, prior_scale: Optional[float] = None,
                 probes: str = "gaussian", reference=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Positions and log q estimate for a given latent state (w (B, D), eps (B, P, D)).

        Returns x ((B, n_atoms, 3) nm or (B, D)) and log_q (B,) in nats. For an internal-coordinate
        flow, x is in the canonical frame, or in the orientation of ``reference`` positions
        ((B or 1, N, 3), nm) if given; log q does not depend on the orientation.
        """
        exact, s = self._resolve(estimator, exact_inverse, prior_scale, probes)
        with _plain_execution():
            x, log_q = self._call("log_q", self.latent(w, s), eps, estimator, exact, s)
        return self._shape(self._orient(x, reference, None)), log_q

    def propose(self, n: int, noise: _noise.Noise, estimator: str = "fp++", n_probes: int = 1,
                exact_inverse: Optional[bool] = None, prior_scale: Optional[float] = None,
                probes: str = "gaussian", reference=None) -> Proposal:
        """Draw ``n`` independent proposals x ~ q with their log q estimates (see :class:`Proposal`).

        Internal-coordinate flows: each proposal gets a Haar-random orientation, or the orientation
        of ``reference`` positions ((1 or n, N, 3), nm; e.g. the current state of a chain, which
        keeps a Metropolis move exact since the target is rotation invariant).
        """
        self._resolve(estimator, exact_inverse, prior_scale, probes)
        dev = self.device  # noise is drawn where the network runs (the same numbers on every device)
        w = noise.gaussian(n, self.dim, device=dev)
        P = self.n_probe_sets(estimator, n_probes)
        eps = (noise.gaussian(n, self.dim, sets=P, device=dev) if P > 0
               else torch.zeros(n, 0, self.dim, dtype=torch.float64, device=dev))
        x, log_q = self.evaluate(w, eps, estimator, exact_inverse, prior_scale, probes)
        if self.metadata.get("orientation") == "haar":
            x = self._shape(self._orient(x.reshape(n, -1), reference, noise if reference is None else None))
        return Proposal(x, log_q, w.cpu(), eps.cpu())

    @torch.no_grad()
    def refresh(self, x, noise: _noise.Noise, estimator: str = "fp++", n_probes: int = 1,
                prior_scale: Optional[float] = None, probes: str = "gaussian",
                exact_inverse: Optional[bool] = None) -> Proposal:
        """Map positions to the latent space and redraw the auxiliary directions from rho(u | x).

        This Gibbs step makes any x-move (MD, replica swaps) followed by flow-perturbation
        Metropolis exact (docs/algorithm.md section 4). Returns a :class:`Proposal` for the *current*
        state: x (the input, centre of mass removed for mean-free flows), log q, and a full
        unprojected latent state (w, eps) with w = z/s + (I - P) g and eps = r u + (I - P) g',
        r ~ chi_d, so that latent-local moves can continue from it. Rows whose exact inverse did
        not converge have NaN log q.

        The map x -> z always uses the exact inverse of the discrete flow (a z that does not map
        back to x would make the state inconsistent); ``exact_inverse`` is accepted so that the
        same keyword set serves ``propose`` and ``refresh``, and is ignored here.
        """
        _, s = self._resolve(estimator, exact_inverse, prior_scale, probes)
        xf = self._flat(x)
        B, D, P = xf.shape[0], self.dim, self.n_probe_sets(estimator, n_probes)
        dev = self.device  # noise is drawn where the network runs (the same numbers on every device)
        g = (noise.gaussian(B, D, self._latent_mean_free_atoms, sets=P, device=dev) if P > 0
             else torch.zeros(B, 0, D, dtype=torch.float64))
        with _plain_execution():
            z, u, log_q = self._call("refresh", xf, g, estimator, True, s)
        w = self._standard_normal_state(z, s) + self._complement(noise, B, 0)
        if P > 0 and estimator in ("fp", "fp++"):
            r = noise.chi(B * P, self.d, device=dev).cpu().reshape(B, P, 1)
            eps = r * u + self._complement(noise, B, P)
        else:
            eps = g.cpu()
        return Proposal(self._shape(xf), log_q, w, eps)

    def _complement(self, noise: _noise.Noise, B: int, sets: int) -> torch.Tensor:
        """(I - P) g: the part of a standard normal orthogonal to the mean-free subspace (0 if none)."""
        shape = (B, sets, self.dim) if sets > 0 else (B, self.dim)
        if self._latent_mean_free_atoms == 0:
            return torch.zeros(shape, dtype=torch.float64)
        g = noise.gaussian(B, self.dim, sets=sets, device=self.device).cpu()  # (I - P) on the CPU: same bits
        return g - _noise.project_mean_free(g, self._latent_mean_free_atoms)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, prior_scale: Optional[float] = None) -> torch.Tensor:
        """Draw ``n`` samples from the flow (no weights); (n, n_atoms, 3) nm or (n, D)."""
        noise = _noise.Noise(seed)
        w = noise.gaussian(n, self.dim, device=self.device)
        with _plain_execution():
            x = self._call("sample", self.latent(w, prior_scale))
        return self._shape(self._orient(x, None, noise))

    @torch.no_grad()
    def inverse(self, x, exact: bool = True) -> torch.Tensor:
        """Latent z = f^-1(x) (B, D); exact inverse of the discrete map by default (NaN where it fails)."""
        with _plain_execution():
            return self._call("inverse", self._flat(x), exact)

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the scripted module and its metadata to ``path`` atomically (temporary file + rename)."""
        path = os.fspath(path)
        meta = {_META: json.dumps(self.metadata)}
        velocity = getattr(getattr(self.module, "cnf", None), "velocity", None)
        if hasattr(velocity, "clear_cache"):  # the linear map's cached matrices stay out of the file
            velocity.clear_cache()
        atomic_write(path, lambda tmp: torch.jit.save(self.module, tmp, _extra_files=meta), suffix=".pt")
        self.path = os.path.abspath(path)

    @classmethod
    def load(cls, path: str, map_location: str = "cpu") -> "PerturbedFlow":
        """Load a flow file written by :meth:`save`.

        Raises
        ------
        FlowFileError
            If the file is missing, truncated/corrupt, or not an openmm-flowpert flow.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FlowFileError(f"flow file {path!r} does not exist; train one with "
                                "openmm_flowpert.train_flow(...).save(path) or check the path")
        extra = {_META: ""}
        try:
            module = torch.jit.load(path, map_location=map_location, _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError / ValueError for damaged archives
            raise FlowFileError(f"flow file {path!r} cannot be read (truncated or corrupt?): "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                                "Re-copy or re-train it.") from None
        try:
            meta = json.loads(extra[_META]) if extra[_META] else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
        if meta.get("format") != FORMAT:
            raise FlowFileError(f"{path!r} is a TorchScript file but not an openmm-flowpert flow "
                                "(no flowpert metadata); save flows with PerturbedFlow.save")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise FlowFileError(f"{path!r} has flow format version {meta['version']}, newer than this "
                                f"openmm-flowpert understands ({FORMAT_VERSION}); upgrade the package")
        _noise.check_backend(meta.get(_noise.BACKEND_KEY), f"flow file {path!r}")
        return cls(module, meta, path=os.path.abspath(path))

    def __repr__(self) -> str:
        m = self.metadata
        what = f"n_atoms={m['n_atoms']}" if m["n_atoms"] else f"dim={m['dim']}"
        return (f"PerturbedFlow({what}, d={m['d']}, integrator={m['integrator']}, n_steps={m['n_steps']}, "
                f"prior_scale={m['prior_scale']})")
