"""Pick the C-alpha pair that separates folded from unfolded CLN025 best, from your own data.

    python examples/chignolin/select_pair.py FOLDED.dcd UNFOLDED.dcd [--top FOLDED.pdb] [--plot pair.png]

FOLDED: frames of the native hairpin (e.g. 300 K MD from the crystal structure); UNFOLDED: frames
that have left it (e.g. 600 K MD, or the hottest replica of `flowpert chignolin data`). Prints the
ten best pairs by the Fisher ratio (mean_u - mean_f)^2 / (var_f + var_u) of their C-alpha distance,
with both means (nm) and the fraction of each ensemble below the 0.75 nm threshold.
"""
import argparse

import numpy as np

from openmm_flowpert.analysis import ca_distances, select_ca_pair
from openmm_flowpert.cli._io import read_trajectory


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folded")
    ap.add_argument("unfolded")
    ap.add_argument("--top", default=None, help="topology (default: the .pdb next to each trajectory)")
    ap.add_argument("--threshold", type=float, default=0.75, help="nm")
    ap.add_argument("--plot", default=None, help="histogram of the best pair's distance (PNG)")
    args = ap.parse_args()
    xf, top = read_trajectory(args.folded, args.top)
    xu, _ = read_trajectory(args.unfolded, args.top)
    pair, score, table = select_ca_pair(xf, xu, top)
    names = {r.index: f"{r.name}{r.index + 1}" for r in top.residues}
    print(f"{len(xf)} folded and {len(xu)} unfolded frames; best pair {names[pair[0]]}-{names[pair[1]]} "
          f"(0-based residues {pair})")
    print("pair          Fisher   <d> folded  <d> unfolded  P(d<thr) folded  P(d<thr) unfolded")
    for i, j, s, mf, mu in table[:10]:
        df, du = ca_distances(xf, top, (i, j))[:, 0], ca_distances(xu, top, (i, j))[:, 0]
        print(f"{names[i]:>5s}-{names[j]:<6s} {s:7.2f}   {mf:9.3f}   {mu:11.3f}   {np.mean(df < args.threshold):14.2f}"
              f"   {np.mean(du < args.threshold):16.2f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        df, du = ca_distances(xf, top, pair)[:, 0], ca_distances(xu, top, pair)[:, 0]
        fig, ax = plt.subplots(figsize=(5, 3.4))
        bins = np.linspace(min(df.min(), du.min()), max(df.max(), du.max()), 50)
        ax.hist(df, bins, density=True, histtype="step", lw=1.5, label="folded")
        ax.hist(du, bins, density=True, histtype="step", lw=1.5, label="unfolded")
        ax.axvline(args.threshold, color="k", ls=":")
        ax.set_xlabel(f"C-alpha distance {names[pair[0]]}-{names[pair[1]]} (nm)")
        ax.legend()
        fig.tight_layout()
        from openmm_flowpert._files import atomic_write

        atomic_write(args.plot, lambda tmp: fig.savefig(tmp, dpi=150, format="png"), suffix=".png")


if __name__ == "__main__":
    main()
