"""Velocity fields v(t, y) for continuous normalizing flows."""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class VelocityMLP(nn.Module):
    """MLP velocity field with a Fourier time embedding, optionally conditioned.

    v(t, y; c) = MLP([y, t, sin(2^j pi t), cos(2^j pi t), c]_{j < n_freq}) [+ A(t; c) y]; the time
    (and condition) part of the first layer is a separate bias so that one time value is embedded
    once per batch. With ``linear=True`` a full linear map of y whose matrix depends on the time
    features, A(t; c) = A_0 + sum_j phi_j(t; c) A_j (phi the embedding above; zero at
    initialization), is added to the MLP: the exact flow-matching field between Gaussians is linear
    in y with a time-dependent matrix, so the network then only learns what is not Gaussian. It
    costs one (D x D) matrix product per evaluation when the batch shares one time value (the
    integrator; a compiled flow keeps the matrices of its last few time values, so the integrator
    and its inverse build each A(t) once per step) and (1 + J) of them per sample in training.
    ``c`` is a vector of ``n_cond`` conditioning features (e.g. log(T / T0) of a
    temperature-conditioned flow); the compiled flow uses the buffer ``cond`` (1, n_cond), which
    fixes the condition of one flow
    (:meth:`PerturbedFlow.at_temperature <openmm_flowpert.PerturbedFlow.at_temperature>` sets it),
    while training passes a condition per sample to :meth:`forward_cond`.

    Parameters
    ----------
    dim : int
        Dimension D of y.
    hidden : int
        Width of the hidden layers.
    n_layers : int
        Number of hidden layers (>= 1).
    n_freq : int
        Number of Fourier frequencies of the time embedding.
    n_cond : int
        Number of conditioning features (0: an unconditioned field).
    periodic : sequence of int
        Indices of the coordinates that are angles of period 2 pi (default: none).
    linear : bool
        Add the time-dependent linear map A(t; c) y (its input is the network's input: cos and sin
        of periodic coordinates, so the field stays periodic in them).
    linear_exclude : sequence of int
        Coordinates the linear map leaves out, as inputs and as outputs (default: none; ignored
        without the linear map); e.g. the torsions of an internal-coordinate flow, whose multimodal
        distribution a linear map fitted to the main basin extrapolates badly into the others.

    Examples
    --------
    >>> v = VelocityMLP(6, hidden=32, linear=True)
    >>> v(torch.full((1, 1), 0.5), torch.zeros(4, 6)).shape
    torch.Size([4, 6])
    """

    _lin_cache: List[Tuple[torch.Tensor, torch.Tensor]]  # (basis row, A) of a frozen compiled field (CPU)

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, n_freq: int = 4, n_cond: int = 0,
                 periodic: Sequence[int] = (), linear: bool = False, linear_exclude: Sequence[int] = ()):
        super().__init__()
        if dim < 1 or hidden < 1 or n_layers < 1 or n_cond < 0:
            raise ValueError("dim, hidden and n_layers must be positive and n_cond >= 0")
        per = sorted({int(i) for i in periodic})
        if per and not (0 <= per[0] and per[-1] < dim):
            raise ValueError(f"periodic coordinates {per} are outside 0 .. {dim - 1}")
        self.dim = dim
        self.width, self.n_layers, self.n_freq, self.n_cond = int(hidden), int(n_layers), int(n_freq), int(n_cond)
        self.periodic = per
        self.n_periodic = len(per)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))
        self.register_buffer("cond", torch.zeros(1, self.n_cond))
        self.register_buffer("periodic_index", torch.tensor(per, dtype=torch.long))
        self.register_buffer("plain_index", torch.tensor([i for i in range(dim) if i not in set(per)],
                                                         dtype=torch.long))
        self.inp = nn.Linear(dim + len(per), hidden)
        self.time_inp = nn.Linear(1 + 2 * n_freq + self.n_cond, hidden, bias=False)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_layers - 1)])
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()
        self.linear = bool(linear)
        n_basis = 2 + 2 * n_freq + self.n_cond  # [1, t, sin, cos, c]
        self.lin_weight = nn.Parameter(torch.zeros(n_basis if self.linear else 0, dim, dim + len(per)))
        self.linear_exclude = sorted({int(i) for i in linear_exclude}) if self.linear else []
        if self.linear_exclude and not (0 <= self.linear_exclude[0] and self.linear_exclude[-1] < dim):
            raise ValueError(f"linear_exclude {self.linear_exclude} is outside 0 .. {dim - 1}")
        # which entries of A may be nonzero (rebuilt from the config, so not part of the state dict)
        self.register_buffer("lin_mask", self._linear_mask(), persistent=False)
        self._lin_cache = []

    def _linear_mask(self) -> torch.Tensor:
        """(D, D + m) of 0/1: rows (outputs) and columns (inputs, cos and sin of a periodic one) of
        the excluded coordinates are 0; (0, 0) without a linear map."""
        if not self.linear:
            return torch.zeros(0, 0)
        mask = torch.ones(self.dim, self.dim + self.n_periodic)
        plain = self.plain_index.tolist()  # the input columns, as features() orders them
        for i in self.linear_exclude:
            mask[i] = 0.0
            if i in self.periodic:
                k = len(plain) + self.periodic.index(i)
                mask[:, k] = 0.0
                mask[:, k + self.n_periodic] = 0.0
            else:
                mask[:, plain.index(i)] = 0.0
        return mask

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``t``: shape (1, 1) or (B, 1); ``y``: shape (B, D). Returns v with shape (B, D) at the
        condition of the buffer ``cond``."""
        return self.forward_cond(t, y, self.cond)

    def forward_cond(self, t: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """v(t, y; c) with ``c`` of shape (1 or t's rows, n_cond)."""
        tf = t * self.freqs
        feats = torch.cat([t, torch.sin(tf), torch.cos(tf), c.to(t.dtype).expand(t.shape[0], self.n_cond)], dim=-1)
        f = self.features(y)
        h = self.act(self.inp(f) + self.time_inp(feats))
        for layer in self.hidden:
            h = self.act(layer(h))
        v = self.out(h)
        if self.linear:
            v = v + self._linear_part(torch.cat([torch.ones_like(t), feats], dim=-1), f)
        return v

    def _linear_part(self, basis: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """A(t; c) f for the basis functions (1 or B, J) and the network's input f (B, D + m)."""
        if basis.shape[0] == 1:  # one time value for the batch: A once (or from the cache)
            return f @ self._linear_matrix(basis, f).t()
        w = self.lin_weight.to(f.dtype) * self.lin_mask.to(f.dtype)
        per_basis = (f @ w.reshape(-1, w.shape[2]).t()).reshape(f.shape[0], w.shape[0], w.shape[1])
        return (basis.to(f.dtype).unsqueeze(-1) * per_basis).sum(1)

    def _linear_matrix(self, basis: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """A(t; c) (D, D + m) for one row of basis functions [1, t, ...] (1, J), in f's dtype.

        Building A reads all J weight matrices, which costs ten times the product A f of a small
        batch at D ~ 500; a compiled field whose weights are frozen (every flow that
        :class:`~openmm_flowpert.PerturbedFlow` compiles) therefore keeps the matrices of its last
        four time values (and conditions) on the CPU: one step of the integrator, or every
        fixed-point iteration of its inverse, uses at most three. Eager modules (training) always
        build A anew."""
        cache = torch.jit.is_scripting() and not self.lin_weight.requires_grad and f.device.type == "cpu"
        if cache:
            for entry in self._lin_cache:
                if entry[1].dtype == f.dtype and torch.equal(entry[0], basis):
                    return entry[1]
        w = self.lin_weight.to(f.dtype)
        a = (basis.to(f.dtype).reshape(-1, 1, 1) * w).sum(0) * self.lin_mask.to(f.dtype)
        if cache:
            if len(self._lin_cache) >= 4:
                self._lin_cache.pop(0)
            self._lin_cache.append((basis.clone(), a))
        return a

    @torch.jit.export
    def clear_cache(self) -> None:
        """Forget the cached matrices A(t) (before saving, so that files do not carry them)."""
        self._lin_cache.clear()

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """The network's input for y (B, D): y itself, or [plain coordinates, cos, sin of the
        periodic ones] (B, D + m)."""
        if self.n_periodic == 0:
            return y
        a = y.index_select(1, self.periodic_index)
        return torch.cat([y.index_select(1, self.plain_index), torch.cos(a), torch.sin(a)], dim=1)

    # -- Python only: the sizes a flow file records (``metadata["velocity"]``) --------------------
    def config(self) -> Dict[str, Any]:
        """``{"kind", "dim", "hidden", "n_layers", "n_freq", "n_cond"}`` (and ``"periodic"`` when
        there are periodic coordinates): rebuilds it with :func:`velocity_from_state`."""
        cfg = {"kind": "VelocityMLP", "dim": int(self.dim), "hidden": self.width, "n_layers": self.n_layers,
               "n_freq": self.n_freq, "n_cond": self.n_cond}
        if self.periodic:
            cfg["periodic"] = list(self.periodic)
        if self.linear:
            cfg["linear"] = True
        if self.linear_exclude:
            cfg["linear_exclude"] = list(self.linear_exclude)
        return cfg


def velocity_config(velocity: nn.Module) -> Optional[Dict[str, Any]]:
    """The recorded sizes of a velocity field (None when it is not a :class:`VelocityMLP`)."""
    return velocity.config() if isinstance(velocity, VelocityMLP) else None


def guess_velocity_config(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Sizes of a :class:`VelocityMLP` from its weights (flow files written before the sizes were
    recorded). Raises KeyError when the weights are not a VelocityMLP's."""
    hidden = state["inp.weight"].shape[0]
    dim = state["out.weight"].shape[0]
    n_hidden = len([k for k in state if k.startswith("hidden.") and k.endswith(".weight")])
    n_freq = int(state["freqs"].numel())
    cfg = {"kind": "VelocityMLP", "dim": int(dim), "hidden": int(hidden), "n_layers": n_hidden + 1,
           "n_freq": n_freq, "n_cond": int(state["time_inp.weight"].shape[1]) - 1 - 2 * n_freq}
    if "periodic_index" in state and state["periodic_index"].numel():
        cfg["periodic"] = [int(i) for i in state["periodic_index"]]
    if "lin_weight" in state and state["lin_weight"].numel():
        cfg["linear"] = True
    return cfg


def velocity_from_state(config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> VelocityMLP:
    """A :class:`VelocityMLP` with the sizes ``config`` and the weights ``state``."""
    if config.get("kind") != "VelocityMLP":
        raise KeyError(f"velocity kind {config.get('kind')!r}")
    velocity = VelocityMLP(int(config["dim"]), hidden=int(config["hidden"]), n_layers=int(config["n_layers"]),
                           n_freq=int(config["n_freq"]), n_cond=int(config.get("n_cond", 0)),
                           periodic=config.get("periodic", ()), linear=bool(config.get("linear", False)),
                           linear_exclude=config.get("linear_exclude", ()))
    velocity.load_state_dict(with_condition(state, velocity.n_cond, velocity.periodic))
    return velocity


def with_condition(state: Dict[str, torch.Tensor], n_cond: int = 0,
                   periodic: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
    """A VelocityMLP state dict with the ``cond`` and index buffers and the linear map's weight
    (files written before conditioning, periodic coordinates or the linear map existed lack them:
    n_cond = 0, no periodic coordinates, no linear map)."""
    state = dict(state)
    state.pop("lin_mask", None)  # rebuilt from the config (a compiled module's state dict has it)
    if "cond" not in state:
        state["cond"] = torch.zeros(1, n_cond, dtype=state["freqs"].dtype)
    if "periodic_index" not in state:
        per = sorted(int(i) for i in periodic)
        dim = int(state["out.weight"].shape[0])
        state["periodic_index"] = torch.tensor(per, dtype=torch.long)
        state["plain_index"] = torch.tensor([i for i in range(dim) if i not in set(per)], dtype=torch.long)
    if "lin_weight" not in state:
        dim = int(state["out.weight"].shape[0])
        state["lin_weight"] = torch.zeros(0, dim, int(state["inp.weight"].shape[1]), dtype=state["out.weight"].dtype)
    return state
