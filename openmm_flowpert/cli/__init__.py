"""The ``flowpert`` command line."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

__all__ = ["main"]

#: Errors that mean bad input (a refused system, a corrupt flow file, a missing or unwritable path):
#: one line and exit status 2, like argparse's usage errors.
_INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                 FileExistsError)


def _end_progress_bars() -> None:
    """Close progress bars a failed or interrupted run left open, so that the message that follows
    starts on its own line."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # pragma: no cover - cosmetic only
        pass
    sys.stdout.flush()


def _quiet_third_party_warnings() -> None:
    """Logged notices of other packages that are not about the user's input: openmmtools'
    "multistate API is experimental" (on every storage opened) and the deprecation notice of the
    ``simtk`` alias that openmm-torch imports."""
    import logging

    logging.getLogger("openmmtools.multistate").setLevel(logging.ERROR)

    class _NoSimtkNotice(logging.Filter):
        def filter(self, record):
            return "importing 'simtk.openmm' is deprecated" not in str(record.msg)

    root = logging.getLogger()
    if not any(isinstance(f, _NoSimtkNotice) or type(f).__name__ == "_NoSimtkNotice" for f in root.filters):
        root.addFilter(_NoSimtkNotice())


def _failure(exc: BaseException, args) -> tuple:
    """Exit status and the one line for a failed command: 130 for Ctrl-C (how to resume), 2 for bad
    input, 1 for an internal error (with the FLOWPERT_TRACEBACK hint)."""
    from ._args import one_line

    if isinstance(exc, KeyboardInterrupt):
        hint = getattr(args, "interrupt_hint", "run the same command again to resume where it stopped")
        return 130, f"interrupted; {hint}"
    msg = one_line(exc)
    if isinstance(exc, _INPUT_ERRORS):
        return 2, f"error: {msg or type(exc).__name__}"
    return 1, (f"internal error ({type(exc).__name__}{': ' + msg[:300] if msg else ''}); rerun with "
               "FLOWPERT_TRACEBACK=1 for the traceback and report it")


def _parser():
    from . import chignolin, demo, sample, simulate, train
    from ._args import ArgumentParser, package_version

    p = ArgumentParser(
        prog="flowpert",
        description="Unbiased Boltzmann sampling with flow perturbation (Peng & Gao 2025) in OpenMM.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    simulate.add_parser(sub)
    train.add_parser(sub)
    sample.add_parser(sub)
    demo.add_parser(sub)
    chignolin.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``flowpert`` console script; returns the exit status.

    * Bad input (a value argparse refuses, or a ``ValueError`` / missing or unwritable path found by
      a command's checks, such as a refused system or a corrupt flow file) prints the one line
      ``flowpert COMMAND: error: ...`` and returns 2. Every command checks its arguments and output
      paths before any work starts.
    * Ctrl-C prints one line saying how to resume (run the same command again) and returns 130.
    * Any other exception is an internal error: one line naming it and returns 1.

    ``FLOWPERT_TRACEBACK=1`` re-raises instead (the full traceback).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 0
    from ..analysis import _pymbar_timeseries

    name = f"flowpert {args.command}"
    traceback = bool(os.environ.get("FLOWPERT_TRACEBACK"))
    try:
        _pymbar_timeseries()  # pymbar's import banner and caution, before openmmtools imports it
        _quiet_third_party_warnings()
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # every failure: one line and an exit status
        if traceback:
            raise
        _end_progress_bars()
        status, line = _failure(exc, args)
        print(f"{name}: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
