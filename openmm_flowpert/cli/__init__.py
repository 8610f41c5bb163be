"""The ``flowpert`` command line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowpert",
        description="Unbiased Boltzmann sampling with flow perturbation (Peng & Gao 2025) in OpenMM.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    from . import chignolin, demo, sample, simulate, train

    simulate.add_parser(sub)
    train.add_parser(sub)
    sample.add_parser(sub)
    demo.add_parser(sub)
    chignolin.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``flowpert`` console script.

    Bad input (a ``ValueError`` such as a refused system or a corrupt flow file, or a missing file)
    prints ``flowpert COMMAND: error: ...`` and returns 2, like a usage error; set
    ``FLOWPERT_TRACEBACK=1`` to get the traceback instead.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from ..analysis import _pymbar_timeseries

    _pymbar_timeseries()  # pymbar's import banner and caution, before openmmtools imports it
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("FLOWPERT_TRACEBACK"):
            raise
        print(f"flowpert {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
