"""Conditional flow matching (optimal-transport path) for the CNF of a :class:`PerturbedFlow`.

Path: y_t = (1 - t) z + t y_1 with z ~ N(0, s^2 I) and y_1 a normalized data sample; the
regression target of v(t, y_t) is y_1 - z. Trained in float32 with Adam and an exponential moving
average (EMA) of the weights; the exported flow uses the EMA weights in float64.

Normalization (the flow's fixed transform): for molecules with a topology, internal coordinates
(:class:`~openmm_flowpert.flow.NormalizedInternal`: bonds, angles and cut torsions scaled by their
data spread, orientation Haar-distributed, d = 3N - 6); for molecules without one, mean-free
Cartesians scaled by their RMS spread around the mean structure (d = 3N - 3); for abstract
targets, per-coordinate standardization.
"""
from __future__ import annotations

import copy
import math
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from .._files import atomic_write
from ..flow import Affine, InternalCoordinates, NormalizedInternal, VelocityMLP, build_zmatrix, time_grid
from ..noise import project_mean_free
from ..perturbed_flow import PerturbedFlow

__all__ = ["train_flow"]


def _as_samples(samples, remove_com: Optional[bool]):
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    if x.dim() == 3:
        if x.shape[-1] != 3:
            raise ValueError(f"molecular samples must have shape (n_samples, n_atoms, 3) in nm; got {tuple(x.shape)}")
        n_atoms = x.shape[1]
        remove_com = True if remove_com is None else bool(remove_com)
        if remove_com and n_atoms < 2:
            raise ValueError("remove_com=True needs at least 2 atoms; use remove_com=False")
        x = x.reshape(x.shape[0], -1)
    elif x.dim() == 2:
        n_atoms = 0
        if remove_com:
            raise ValueError("remove_com=True needs molecular samples of shape (n_samples, n_atoms, 3)")
        remove_com = False
    else:
        raise ValueError(f"samples must be (n_samples, n_atoms, 3) or (n_samples, d); got {tuple(x.shape)}")
    if x.shape[0] < 10:
        raise ValueError(f"need at least 10 samples to train a flow, got {x.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("samples contain NaN or infinite coordinates")
    return x, n_atoms, remove_com


def _internal_transform(topology, x: torch.Tensor, n_atoms: int) -> NormalizedInternal:
    if topology is None:
        raise ValueError("coordinates='internal' needs the topology (openmm.app.Topology or mdtraj.Topology)")
    if hasattr(topology, "to_openmm"):  # mdtraj
        topology = topology.to_openmm()
    if topology.getNumAtoms() != n_atoms:
        raise ValueError(f"the topology has {topology.getNumAtoms()} atoms but the samples have {n_atoms}")
    ic = InternalCoordinates(build_zmatrix(topology), n_atoms)
    return NormalizedInternal.fit(ic, x)


def _save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp), suffix=".pt")


def _load_checkpoint(path: str, dim: int, seed: int) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"training checkpoint {path!r} cannot be read ({exc}); delete it to start over") from None
    if ck.get("dim") != dim or ck.get("seed") != int(seed):
        raise ValueError(f"training checkpoint {path!r} belongs to another run (dimension {ck.get('dim')}, seed "
                         f"{ck.get('seed')}; this run: {dim}, {seed}); delete it or use another checkpoint path")
    return ck


def _median_energy(flow: PerturbedFlow, energy: Callable, n: int, seed: int) -> float:
    u = np.asarray(energy(flow.sample(n, seed=seed)), dtype=np.float64)
    return float(np.median(np.where(np.isfinite(u), u, np.inf)))


def train_flow(samples, *, topology=None, coordinates: Optional[str] = None,
               remove_com: Optional[bool] = None, n_steps: int = 20, grid: str = "quadratic",
               scheme: str = "rk4", hidden: int = 128, n_layers: int = 3, n_freq: int = 4,
               epochs: int = 200, batch_size: int = 256, lr: float = 2e-3, weight_decay: float = 0.0,
               ema: float = 0.995, validation_fraction: float = 0.1, patience: int = 20,
               max_minutes: Optional[float] = None, prior_scale: float = 1.0,
               temperature: Optional[float] = None, energy: Optional[Callable] = None,
               n_validation_proposals: int = 256, checkpoint: Optional[str] = None, checkpoint_every: int = 10,
               seed: int = 0, device: str = "cpu", mixed_precision: bool = False,
               progress: bool = True) -> PerturbedFlow:
    """Train a perturbed flow on samples by flow matching.

    Parameters
    ----------
    samples : array, (n_samples, n_atoms, 3) in nm, or (n_samples, d)
        Training configurations (molecular) or points (abstract targets).
    topology : openmm.app.Topology or mdtraj.Topology, optional
        Bonds of the molecule; with it the flow works in internal coordinates (the default then).
    coordinates : {"internal", "cartesian"}, optional
        ``"internal"`` (needs ``topology``; recommended for molecules: d = 3N - 6, bonds and angles
        at their own scale) or ``"cartesian"`` (mean-free Cartesians, d = 3N - 3).
    remove_com : bool, optional
        Cartesian flows: work in the mean-free subspace (d = 3N - 3). Default: True for molecular
        samples; must be False for (n, d) arrays.
    n_steps, grid, scheme : int, str, str
        Integrator: number of steps, time grid (``"quadratic"`` refines toward the data end, or
        ``"uniform"``), and scheme (``"rk4"``, ``"midpoint"``, ``"euler"``).
    hidden, n_layers, n_freq : int
        Velocity MLP width, depth and number of time frequencies.
    epochs, batch_size, lr, weight_decay, ema : training schedule (Adam with cosine decay, EMA weights).
    validation_fraction, patience : held-out fraction and early-stopping patience (epochs).
    max_minutes : float, optional
        Wall-clock budget; training stops (keeping the best weights) when it is spent.
    prior_scale : float
        Standard deviation s of the latent prior.
    temperature : float, optional
        Temperature (K) of the training data, stored as metadata.
    energy : callable, optional
        Reduced potential u(x) (kT) of positions (B, N, 3) nm. If given, the trained flow is
        validated by the median reduced energy of ``n_validation_proposals`` proposals against that
        of the training data (stored in ``metadata["training"]``; a flow whose proposals sit far
        above the data is not going to be accepted).
    checkpoint : str, optional
        File for the training state (weights, EMA, optimizer, noise generator), written atomically
        every ``checkpoint_every`` epochs and at the end. If it exists, training resumes from it:
        an interrupted run resumed with the same data and arguments gives the same flow as an
        uninterrupted one.
    seed : int
        Seeds the split, initialization and noise: equal seeds give equal flows.
    device : str
        Torch device of the training (``"cpu"``, ``"cuda"``). The noise is drawn on the CPU from the
        seeded generator either way; the returned flow lives on the CPU.
    mixed_precision : bool
        bfloat16 autocast of the velocity network's forward pass on a CUDA device (the loss, the
        optimizer and the saved weights stay float32); the integrated flow and every log q are
        evaluated in float64 afterwards, so this only affects training speed and the fit.
    progress : bool
        Show a tqdm progress bar with the training and validation losses.

    Returns
    -------
    PerturbedFlow
        With metadata ``training`` = {epochs run, best validation loss, wall time (s)}.

    Examples
    --------
    >>> gmm = GaussianMixtureTarget(dim=10)                           # doctest: +SKIP
    >>> flow = train_flow(gmm.sample(20000, weights=(0.5, 0.5)), epochs=50)  # doctest: +SKIP
    """
    t_start = time.time()
    tdev = torch.device(device)
    if mixed_precision and tdev.type != "cuda":
        raise ValueError("mixed_precision=True needs device='cuda' (bfloat16 autocast on a GPU); "
                         "train in float32 on the CPU")
    if coordinates is None:
        coordinates = "internal" if topology is not None else "cartesian"
    if coordinates not in ("internal", "cartesian"):
        raise ValueError(f"coordinates must be 'internal' or 'cartesian', got {coordinates!r}")
    x, n_atoms, remove_com = _as_samples(samples, True if coordinates == "internal" else remove_com)
    if coordinates == "internal" and n_atoms < 3:
        raise ValueError("internal coordinates need molecular samples (n_samples, n_atoms >= 3, 3)")
    npart = n_atoms if remove_com and coordinates == "cartesian" else 0
    if remove_com:
        x = project_mean_free(x, n_atoms)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))

    if coordinates == "internal":
        transform = _internal_transform(topology, x, n_atoms)
        y, _ = transform.inverse(x)
        keep = torch.isfinite(y).all(1)
        if int(keep.sum()) < 10:
            raise ValueError("fewer than 10 samples have valid internal coordinates (collinear atoms?)")
        y = y[keep].float()
    else:
        # Data-scale normalization (the flow's fixed affine transform): the mean structure and the
        # spread *around* it -- one number for a mean-free flow, one per coordinate otherwise -- so
        # the normalized data have unit scale like the prior and the flow is not needlessly stiff.
        shift = x.mean(0)
        dev = x - shift
        scale = dev.pow(2).mean().sqrt().clamp_min(1e-6).reshape(1) if remove_com else dev.std(0).clamp_min(1e-6)
        transform = Affine(shift, scale, n_particles=npart)
        y = ((x - transform.shift) / transform.scale).float()

    perm = torch.randperm(y.shape[0], generator=gen)
    n_val = max(1, int(round(validation_fraction * y.shape[0]))) if validation_fraction > 0 else 0
    y_val, y_train = y[perm[:n_val]].to(tdev), y[perm[n_val:]].to(tdev)
    D = y.shape[1]

    def draw_prior(n: int, g: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, D, generator=g)
        return (prior_scale * (project_mean_free(z, npart) if npart else z)).to(tdev)

    def project(v: torch.Tensor) -> torch.Tensor:
        return project_mean_free(v, npart) if npart else v

    velocity = VelocityMLP(D, hidden=hidden, n_layers=n_layers, n_freq=n_freq).to(tdev)
    ema_model = copy.deepcopy(velocity)
    for p in ema_model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(velocity.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(y_train.shape[0] / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)

    # Fixed validation noise, so validation losses are comparable across epochs.
    vgen = torch.Generator().manual_seed(int(seed) + 1)
    if n_val:
        z_val, t_val = draw_prior(n_val, vgen), torch.rand(n_val, 1, generator=vgen).to(tdev)

    def loss_on(model, y1, z, t):
        yt = (1 - t) * z + t * y1
        with torch.autocast(device_type=tdev.type, dtype=torch.bfloat16, enabled=mixed_precision):
            v = model(t, yt)
        return ((project(v.float()) - (y1 - z)) ** 2).sum(1).mean()

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="train flow", unit="epoch")
    best, best_state, since_best, epoch = float("inf"), copy.deepcopy(ema_model.state_dict()), 0, 0
    start_epoch, elapsed_before = 1, 0.0
    if checkpoint is not None and os.path.exists(checkpoint):
        ck = _load_checkpoint(checkpoint, D, seed)
        velocity.load_state_dict(ck["velocity"])
        ema_model.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        best, best_state, since_best = ck["best"], ck["best_state"], ck["since_best"]
        start_epoch, elapsed_before = ck["epoch"] + 1, ck["elapsed"]
        epoch = ck["epoch"]
        t_start -= elapsed_before
        if bar is not None:
            bar.update(ck["epoch"])
    stopped = False
    for epoch in range(start_epoch, epochs + 1):
        velocity.train()
        order = torch.randperm(y_train.shape[0], generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            y1 = y_train[order[i * batch_size:(i + 1) * batch_size]]
            loss = loss_on(velocity, y1, draw_prior(y1.shape[0], gen),
                           torch.rand(y1.shape[0], 1, generator=gen).to(tdev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for pe, p in zip(ema_model.parameters(), velocity.parameters()):
                    pe.mul_(ema).add_(p.detach(), alpha=1 - ema)
            total += float(loss.detach()) * y1.shape[0]
        train_loss = total / y_train.shape[0]
        with torch.no_grad():
            val = float(loss_on(ema_model, y_val, z_val, t_val)) if n_val else train_loss
        if val < best:
            best, best_state, since_best = val, copy.deepcopy(ema_model.state_dict()), 0
        else:
            since_best += 1
        if bar is not None:
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{best:.4f}")
            bar.update(1)
        stopped = since_best >= patience or (max_minutes is not None and time.time() - t_start > 60.0 * max_minutes)
        if checkpoint is not None and (stopped or epoch % checkpoint_every == 0 or epoch == epochs):
            _save_checkpoint(checkpoint, {
                "velocity": velocity.state_dict(), "ema": ema_model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "gen": gen.get_state(), "best": best, "best_state": best_state,
                "since_best": since_best, "epoch": epoch, "elapsed": time.time() - t_start,
                "dim": D, "seed": int(seed)})
        if stopped:
            break
    if bar is not None:
        bar.close()
    ema_model.load_state_dict(best_state)
    ema_model = ema_model.cpu()
    info = {"epochs": epoch, "best_validation_loss": best, "wall_time_s": round(time.time() - t_start, 2),
            "hidden": hidden, "n_layers": n_layers, "n_freq": n_freq, "n_samples": int(x.shape[0]),
            "seed": int(seed), "coordinates": coordinates, "device": str(tdev),
            "mixed_precision": bool(mixed_precision)}
    flow = PerturbedFlow.build(ema_model, time_grid(n_steps, grid), transform, n_particles=npart, scheme=scheme,
                               prior_scale=prior_scale, temperature=temperature, n_atoms=n_atoms,
                               extra={"grid": grid, "training": info})
    if energy is not None:
        if n_atoms == 0:
            raise ValueError("energy validation is for molecular flows")
        pick = torch.randperm(x.shape[0], generator=gen)[:n_validation_proposals]
        data_u = np.asarray(energy(x[pick].reshape(-1, n_atoms, 3)), dtype=np.float64)
        info["data_median_energy"] = float(np.median(data_u))
        info["proposal_median_energy"] = _median_energy(flow, energy, n_validation_proposals, seed)
        flow.metadata["training"] = info
    return flow
