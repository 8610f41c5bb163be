"""Figures of the command line (matplotlib, Agg backend, PNG written atomically)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .._files import atomic_write


def _figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kw)


def _save(plt, fig, path: str, tight: bool = True) -> str:
    if tight:
        fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"), ".png")
    plt.close(fig)
    return path


def energy_histograms(path: str, energies: Dict[str, np.ndarray], temperature: Optional[float] = None,
                      range_from: Optional[Sequence[str]] = None) -> str:
    """Histograms of reduced energies u = U/kT (one curve per label, e.g. flow proposals, accepted, MD).

    The axis spans the 0.5-99.5 percentiles of all curves, or of the curves named in ``range_from``
    (values outside are drawn in the edge bins, so a poor flow's proposals stay visible)."""
    plt, (fig, ax) = _figure(figsize=(5.5, 3.8))
    finite = [np.asarray(v)[np.isfinite(v)] for k, v in energies.items()
              if len(v) and (not range_from or k in range_from)]
    lo = min(np.percentile(v, 0.5) for v in finite)
    hi = max(np.percentile(v, 99.5) for v in finite)
    bins = np.linspace(lo, hi, 60)
    for label, u in energies.items():
        u = np.asarray(u)
        u = u[np.isfinite(u)]
        if len(u):
            ax.hist(np.clip(u, lo, hi), bins=bins, density=True, histtype="step", lw=1.5,
                    label=f"{label} (n={len(u)}, median {np.median(u):.1f})")
    ax.set_xlabel("reduced potential energy u = U/kT" + (f"  (T = {temperature:g} K)" if temperature else ""))
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def acceptance_over_time(path: str, accepted: np.ndarray, proposed: np.ndarray, window: int = 20) -> str:
    """Running acceptance of flow moves (window of iterations) and the cumulative acceptance."""
    plt, (fig, ax) = _figure(figsize=(5.5, 3.5))
    a, p = np.asarray(accepted, float), np.asarray(proposed, float)
    it = np.arange(1, len(a) + 1)
    cum = np.cumsum(a) / np.maximum(np.cumsum(p), 1)
    window = max(1, min(window, len(a)))
    k = np.ones(window)
    run = np.convolve(a, k, "valid") / np.maximum(np.convolve(p, k, "valid"), 1)
    ax.plot(it[window - 1:], run, lw=0.8, label=f"running ({window} iterations)")
    ax.plot(it, cum, lw=1.5, label="cumulative")
    ax.set_xlabel("iteration")
    ax.set_ylabel("flow-move acceptance")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def ramachandran(path: str, panels: Dict[str, Tuple[np.ndarray, np.ndarray]], kT_label: str = "kT") -> str:
    """Side-by-side free-energy surfaces -ln p(phi, psi) (in kT, minimum 0) of several runs."""
    plt, (fig, axes) = _figure(1, len(panels), figsize=(4.4 * len(panels) + 1.0, 3.9), squeeze=False,
                               constrained_layout=True)
    edges = np.linspace(-np.pi, np.pi, 49)
    for ax, (label, (phi, psi)) in zip(axes[0], panels.items()):
        h, _, _ = np.histogram2d(np.ravel(phi), np.ravel(psi), bins=[edges, edges], density=True)
        with np.errstate(divide="ignore"):
            f = -np.log(h)
        f -= np.nanmin(f[np.isfinite(f)]) if np.isfinite(f).any() else 0
        im = ax.pcolormesh(edges, edges, np.ma.masked_invalid(f).T, cmap="viridis", vmin=0, vmax=10)
        ax.set_title(f"{label} (n={np.size(phi)})", fontsize=9)
        ax.set_xlabel("phi (rad)")
        ax.set_ylabel("psi (rad)")
        ax.axvline(0, color="w", lw=0.5, ls="--")
        ax.axvline(2.5, color="w", lw=0.5, ls="--")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"free energy ({kT_label})")
    return _save(plt, fig, path, tight=False)  # constrained layout already placed the colorbar


def smc_traces(path: str, b: np.ndarray, ess: np.ndarray, acceptance: np.ndarray) -> str:
    """SMC diagnostics per step: the exponent b, the ESS fraction before resampling, the acceptance."""
    plt, (fig, ax) = _figure(figsize=(5.5, 3.5))
    steps = np.arange(1, len(ess) + 1)
    ax.plot(steps, np.asarray(b)[1:len(ess) + 1], label="b (weight exponent)")
    ax.plot(steps, ess, label="ESS / walkers")
    ax.plot(steps, acceptance, label="acceptance")
    ax.set_xlabel("SMC step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def folded_fraction_convergence(path: str, series: Dict[str, np.ndarray],
                                points: Optional[Dict[str, Tuple[float, float]]] = None) -> str:
    """Running folded fraction of time series (one curve each) and weighted estimates (mean +- SE)
    drawn as horizontal bands."""
    plt, (fig, ax) = _figure(figsize=(5.5, 3.5))
    for label, v in series.items():
        v = np.asarray(v, float)
        if len(v):
            ax.plot(np.arange(1, len(v) + 1) / len(v), np.cumsum(v) / np.arange(1, len(v) + 1), label=label)
    for label, (m, se) in (points or {}).items():
        line = ax.axhline(m, ls="--", lw=1, label=f"{label}: {m:.3f} +- {se:.3f}")
        ax.axhspan(m - se, m + se, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("fraction of the run")
    ax.set_ylabel("folded fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def distributions(path: str, values: Dict[str, np.ndarray], weights: Optional[Dict[str, np.ndarray]] = None,
                  xlabel: str = "", threshold: Optional[float] = None) -> str:
    """Normalized histograms of one observable for several runs (weighted where weights are given)."""
    plt, (fig, ax) = _figure(figsize=(5.5, 3.5))
    allv = np.concatenate([np.asarray(v, float) for v in values.values() if len(v)])
    bins = np.linspace(allv.min(), allv.max() + 1e-9, 50)
    for label, v in values.items():
        w = None if weights is None else weights.get(label)
        ax.hist(v, bins=bins, weights=w, density=True, histtype="step", lw=1.5, label=f"{label} (n={len(v)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)
