"""Where the importance weights of an alanine-dipeptide flow lose their ESS, and whether a cheap exact
correction on top of the trained CNF recovers it (issue 16). The proposals come from
``benchmarks/alanine.py kish --save`` (or ``quality --save``): positions (nm), exact log q, u (kT).

    python benchmarks/alanine.py kish --flows F.pt --n 4000 --save runs/w_eval.npz          # seed 100
    python benchmarks/alanine.py kish --flows F.pt --n 8000 --seed 200 --save runs/w_train.npz
    python benchmarks/weight_tail.py regions --samples runs/w_eval.npz
    python benchmarks/weight_tail.py correct --flow F.pt --train runs/w_train.npz --eval runs/w_eval.npz \
        --parts spline --objective chi2

``regions``: the Kish ESS split by Ramachandran region: each region's share of the proposals, its mean
normalized weight (1 where the flow puts the right mass there), the Kish ESS within it, and the factor
the between-region mass errors alone put on the ESS (1 / sum_r share_r mean_r^2).
``correct``: a bijection g between the CNF output y and the fixed transform T, x = T(g(y)), with an exact
log-det, fitted with the CNF frozen. The CNF's log-density of a proposal's y is known (the file's exact
log q plus T's log-det), so the corrected flow's exact log W = -u(T(g(y))) - log q_cnf(y) + log|g'(y)| +
log|T'(g(y))| costs one energy per sample, and its gradient is exact (OpenMM's forces): none of the
Hutchinson noise that sank the reverse-KL fine-tuning of the CNF itself. Objectives: ``chi2`` (log of
1 / Kish ESS of a minibatch; needs the training file's exact log q), ``kl`` (reverse KL; needs only
samples). g acts on the bonds and angles only: the torsions' marginal map in ``internal-cdf`` is
piecewise linear, its log-det piecewise constant in y, and a pathwise gradient misses its jumps (a
spline on every coordinate collapsed the proposals into the minima). Parts, chained: ``diag`` (a scale
and shift per coordinate), ``tri`` (a lower-triangular affine map), ``spline`` (a monotone
rational-quadratic spline per coordinate, identity outside [-4, 4]), ``cond`` (an affine map of the
bonds and angles whose scale and shift are an MLP of the torsions).
"""
import argparse
import json
import math
import os
import time

import numpy as np

import openmm_flowpert as fp  # noqa: F401  (first: torch before openmm)
import torch
import torch.nn.functional as F
from torch import nn

from openmm_flowpert.analysis import PHI_BASIN, backbone_dihedrals
from openmm_flowpert.training.importance import kish_fraction as kish


def energy():
    from openmm_flowpert.energies import ReducedPotential
    from openmm_flowpert.systems import get_system

    return ReducedPotential(get_system("alanine-dipeptide").system, 300.0, n_workers=1)


MD_MEDIAN_U = -17.6  # kT: median reduced energy of 300 K MD frames (the reverse KL's soft cap is 100 kT above)


REGIONS = (f"rare basin {PHI_BASIN[0]:g} < phi < {PHI_BASIN[1]:g}", "alpha_R", "beta/C5/PII, psi > 1",
           "beta/C5/PII, psi < -2.2")


def region_of(x: np.ndarray) -> np.ndarray:
    """Index into REGIONS per frame x (B, 3N) nm."""
    from openmm_flowpert.systems import get_system

    phi, psi = (a[:, 0] for a in backbone_dihedrals(x.reshape(len(x), -1, 3), get_system(
        "alanine-dipeptide").topology)[:2])
    left = np.where((psi > -2.2) & (psi < 1.0), 1, np.where(psi >= 1.0, 2, 3))
    return np.where((phi > PHI_BASIN[0]) & (phi < PHI_BASIN[1]), 0, left)


def cmd_regions(args):
    d = np.load(args.samples)
    lw = -d["u"] - d["log_q"]
    w = np.exp(np.where(np.isfinite(lw), lw, -np.inf) - np.nanmax(lw[np.isfinite(lw)]))
    w = w / w.mean()
    reg, rows, between = region_of(d["x"]), [], 0.0
    for r, name in enumerate(REGIONS):
        m = reg == r
        if not m.any():
            continue
        share, mean = float(m.mean()), float(w[m].mean())
        between += share * mean ** 2
        rows.append({"region": name, "share": round(share, 4), "mean_w": round(mean, 3),
                     "kish_within": round(mean ** 2 / float((w[m] ** 2).mean()), 3)})
    print(json.dumps({"n": len(w), "kish": round(kish(lw), 4), "between_region_factor": round(1 / between, 3),
                      "regions": rows}))


class Spline(nn.Module):
    """Monotone rational-quadratic spline per coordinate on [-B, B], identity outside (slope 1 at the ends)."""

    def __init__(self, m: int, K: int = 8, B: float = 4.0):
        super().__init__()
        self.K, self.B = K, B
        self.w = nn.Parameter(torch.zeros(m, K, dtype=torch.float64))
        self.h = nn.Parameter(torch.zeros(m, K, dtype=torch.float64))
        self.d = nn.Parameter(torch.full((m, K - 1), math.log(math.e - 1), dtype=torch.float64))  # slopes 1

    def _knots(self, logits):
        size = 1e-3 + (1 - 1e-3 * self.K) * torch.softmax(logits, -1)
        return torch.cat([torch.zeros_like(size[:, :1]), torch.cumsum(size, -1)], -1) * 2 * self.B - self.B

    def forward(self, v):
        xk, yk = self._knots(self.w), self._knots(self.h)
        one = torch.ones_like(xk[:, :1])
        dk = torch.cat([one, 1e-3 + F.softplus(self.d), one], -1)
        inside = (v > -self.B) & (v < self.B)
        vc = v.clamp(-self.B + 1e-12, self.B - 1e-12)
        k = (torch.searchsorted(xk.contiguous(), vc.T.contiguous()).T - 1).clamp(0, self.K - 1).unsqueeze(-1)

        def at(t):
            return torch.gather(t.expand(v.shape[0], -1, -1), 2, k).squeeze(-1)

        x0, w, y0, h = at(xk[:, :-1]), at(xk[:, 1:] - xk[:, :-1]), at(yk[:, :-1]), at(yk[:, 1:] - yk[:, :-1])
        d0, d1 = at(dk[:, :-1]), at(dk[:, 1:])
        s, xi = h / w, (vc - x0) / w
        om = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * om
        out = y0 + h * (s * xi ** 2 + d0 * om) / den
        slope = s ** 2 * (d1 * xi ** 2 + 2 * s * om + d0 * (1 - xi) ** 2) / den ** 2
        return torch.where(inside, out, v), torch.where(inside, torch.log(slope), torch.zeros_like(v)).sum(-1)


class Affine(nn.Module):
    """v -> A v + b, A lower-triangular with a positive diagonal (``full=False``: diagonal only)."""

    def __init__(self, m: int, full: bool):
        super().__init__()
        self.full = full
        self.L = nn.Parameter(torch.zeros(m, m, dtype=torch.float64), requires_grad=full)
        self.log_diag = nn.Parameter(torch.zeros(m, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(m, dtype=torch.float64))

    def forward(self, v):
        A = torch.tril(self.L, -1) + torch.diag(torch.exp(self.log_diag))
        return v @ A.T + self.b, self.log_diag.sum().expand(v.shape[0])


class Conditional(nn.Module):
    """v -> v exp(s(c)) + b(c) with (s, b) an MLP of the conditioning coordinates c (|s| <= 0.5)."""

    def __init__(self, m: int, c: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * c, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * m)).double()
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, v, c):
        s, b = self.net(torch.cat([c, torch.tanh(c)], 1)).chunk(2, 1)
        s = 0.5 * torch.tanh(s)
        return v * torch.exp(s) + b, s.sum(1)


class Correction(nn.Module):
    """The chained parts acting on the coordinates in ``mask`` (the others pass through and condition)."""

    def __init__(self, parts: str, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        m, c = int(mask.sum()), int((~mask).sum())
        make = {"diag": lambda: Affine(m, False), "tri": lambda: Affine(m, True), "spline": lambda: Spline(m),
                "cond": lambda: Conditional(m, c)}
        self.parts = nn.ModuleList([make[p]() for p in parts.split("+")])

    def forward(self, y):
        v, c = y[:, self.mask], y[:, ~self.mask]
        total = torch.zeros(y.shape[0], dtype=y.dtype)
        for p in self.parts:
            v, ld = p(v, c) if isinstance(p, Conditional) else p(v)
            total = total + ld
        out = y.clone()
        out[:, self.mask] = v
        return out, total


def cmd_correct(args):
    from openmm_flowpert.training.reverse_kl import _ReducedEnergy, soft_cap

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(args.seed)
    _, T = fp.PerturbedFlow.load(args.flow).parts()
    rp = energy()

    def load(path):  # the CNF outputs y of the proposals, and the CNF's exact log-density there
        d = np.load(path)
        y, _ = T.inverse(torch.as_tensor(d["x"], dtype=torch.float64).reshape(len(d["u"]), -1))
        return y, torch.as_tensor(d["log_q"]) + T.forward(y)[1]

    (y_tr, lq_tr), (y_ev, lq_ev) = load(args.train), load(args.eval)
    g = Correction(args.parts, torch.ones_like(T.is_torsion) if args.with_torsions else ~T.is_torsion)

    def log_w(y, lq, grad):
        y2, ld_g = g(y)
        x, ld_T = T.forward(y2)
        u = _ReducedEnergy.apply(x, rp.reduced_energies_and_gradients) if grad else torch.as_tensor(rp(x.numpy()))
        return -u - (lq - ld_g - ld_T), u

    def report(step, loss):
        with torch.no_grad():
            (a, ua), (b, _) = log_w(y_ev, lq_ev, False), log_w(y_tr, lq_tr, False)
        print(json.dumps({"step": step, "loss": loss, "kish_eval": round(kish(a.numpy()), 4),
                          "kish_train": round(kish(b.numpy()), 4), "median_u_eval": round(float(ua.median()), 3),
                          "wall_s": round(time.time() - t0, 1)}), flush=True)

    opt, gen, t0 = torch.optim.Adam(g.parameters(), lr=args.lr), torch.Generator().manual_seed(args.seed), time.time()
    report(0, None)
    for step in range(1, args.steps + 1):
        i = torch.randint(len(y_tr), (args.batch,), generator=gen)
        lw, u = log_w(y_tr[i], lq_tr[i], True)
        if args.objective == "chi2":
            lw = lw[torch.isfinite(lw)]
            loss = torch.logsumexp(2 * lw, 0) - 2 * torch.logsumexp(lw, 0)
        else:  # reverse KL up to a constant: E[u - log|g'| - log|T'|], u softly capped at MD's median + 100 kT
            ok = torch.isfinite(u)
            loss = (soft_cap(u[ok], MD_MEDIAN_U + 100.0) - (lw[ok] + u[ok] + lq_tr[i][ok])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            report(step, round(float(loss), 4))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("regions")
    r.add_argument("--samples", required=True)
    c = sub.add_parser("correct")
    c.add_argument("--flow", default="openmm_flowpert/data/alanine-dipeptide-vacuum-300K.pt")
    c.add_argument("--train", required=True)
    c.add_argument("--eval", required=True)
    c.add_argument("--parts", default="spline")
    c.add_argument("--objective", choices=["chi2", "kl"], default="chi2")
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--steps", type=int, default=600)
    c.add_argument("--batch", type=int, default=512)
    c.add_argument("--every", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--with-torsions", action="store_true", help="g on every coordinate (biased gradients: see above)")
    a = p.parse_args()
    {"regions": cmd_regions, "correct": cmd_correct}[a.cmd](a)


if __name__ == "__main__":
    main()
