"""Checks of the command line's input, made before any work starts.

Option values are checked by argparse ``type=`` helpers (:func:`positive_int`, :func:`seed`,
:func:`temperatures`, :func:`device` ...): a bad value ends in argparse's one-line error. Paths,
systems and files are checked at the start of each command (:func:`output_file`,
:func:`output_folder`, :func:`load_system`, ...) and raise :class:`InputError`, which ``main()``
prints as ``flowpert CMD: error: ...`` with exit status 2. Nothing here writes to disk except
:func:`created_folders`, which the commands enter only after every check passed.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from typing import Iterable, List, Optional, Sequence

#: Seeds go to OpenMM's integrators (int32) and to numpy / torch generators.
MAX_SEED = 2 ** 31 - 1


class InputError(ValueError):
    """Bad input found by the command line's checks (one line, exit status 2)."""


# -- parser and help -----------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``flowpert CMD: error: ...`` and exit status 2 (no usage block,
    which hides the message under a screenful of options; ``--help`` shows them)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's line breaks and appends "(default: X)" to each option's help,
    except for options without a default (None: their help says what happens without them), flags
    and required options."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or action.required:
            return action.help
        return super()._get_help_string(action)


def one_line(text: str) -> str:
    """Error text on one line (messages of some libraries span several)."""
    return " ".join(str(text).split())


# -- argparse type= helpers ----------------------------------------------------------------------------
def _typed(name: str, convert, check, requirement: str):
    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}; give {requirement}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: give {requirement}")
        return value

    parse.__name__ = name.replace(" ", "_")
    return parse


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


positive_int = _typed("an integer", int, lambda v: v >= 1, "a whole number >= 1")
nonnegative_int = _typed("an integer", int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _typed("a number", _finite_float, lambda v: v > 0, "a number > 0")
nonnegative_float = _typed("a number", _finite_float, lambda v: v >= 0, "a number >= 0")
fraction = _typed("a number", _finite_float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
unit_interval = _typed("a number", _finite_float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
seed = _typed("an integer", int, lambda v: 0 <= v <= MAX_SEED, f"a whole number from 0 to {MAX_SEED}")


def parse_temperatures(text: str) -> List[float]:
    """'300' | '300,350,400' | '300:600:8' (8 temperatures from 300 to 600 K spaced geometrically)
    -> list of K (the first is the target). Raises ValueError naming the accepted forms."""
    from ..samplers.replica_exchange import geometric_temperatures

    forms = "give one temperature (300), a list (300,350,400) or LO:HI:N (300:600:8: N temperatures from LO to HI K)"
    text = str(text).strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            lo, hi, n = _finite_float(parts[0]), _finite_float(parts[1]), int(parts[2])
            if n < 1:
                raise ValueError(f"temperatures {text!r}: N (the number of temperatures) must be >= 1; {forms}")
            if not 0 < lo <= hi:
                raise ValueError(f"temperatures {text!r}: LO:HI:N needs 0 < LO <= HI (K); {forms}")
            return geometric_temperatures(lo, hi, n)
        temps = [_finite_float(t) for t in text.split(",")]
    except ValueError as exc:
        if str(exc).startswith("temperatures "):
            raise
        raise ValueError(f"bad temperatures {text!r}; {forms}") from None
    if not temps or any(t <= 0 for t in temps):
        raise ValueError(f"bad temperatures {text!r}: each must be > 0 K; {forms}")
    return temps


def temperatures(text: str) -> List[float]:
    """argparse type of ``--temperatures``: see :func:`parse_temperatures`."""
    try:
        return parse_temperatures(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device(text: str) -> str:
    """argparse type of ``--device``: a torch device that exists on this machine (cpu, cuda, cuda:N)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown torch device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"device {text!r}: no CUDA GPU is available on this machine "
                                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {n} CUDA GPU(s), cuda:0 to "
                                             f"cuda:{n - 1}")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda or cuda:N")
    return text


def platform(text: str) -> str:
    """argparse type of ``--platform``: an OpenMM platform that this installation has."""
    import openmm

    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    for name in names:
        if name.lower() == str(text).lower():
            return name
    raise argparse.ArgumentTypeError(f"unknown OpenMM platform {text!r}; this installation has {', '.join(names)}")


# -- paths ---------------------------------------------------------------------------------------------
def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _check_folder_writable(folder: str, option: str, shown: str) -> None:
    """``folder`` (existing or to be created) can hold new files: its nearest existing ancestor is a
    folder in which a file can be created (tried, then removed)."""
    anc = _existing_ancestor(folder or ".")
    if not os.path.isdir(anc):
        raise InputError(f"{option} {shown!r}: {anc!r} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".flowpert-probe-", dir=anc)
    except OSError as exc:
        raise InputError(f"{option} {shown!r}: cannot write in {anc!r} ({exc.strerror or exc}); choose a "
                         "writable location") from None
    os.close(fd)
    os.unlink(probe)


def output_file(path: str, option: str = "--out", extensions: Sequence[str] = (), companions: Iterable[str] = (),
                what: str = "file") -> None:
    """Check an output file before the run: a known extension, not a folder (nor any of the
    ``companions`` written next to it), in a writable folder (existing or to be created)."""
    if not path or path.endswith(os.sep):
        raise InputError(f"{option} {path!r}: give a {what} name"
                         + (f" ending in {' or '.join(extensions)}" if extensions else ""))
    if os.path.isdir(path):
        raise InputError(f"{option} {path!r} is a folder; give a {what} name, e.g. "
                         f"{os.path.join(path, 'out' + (extensions[0] if extensions else ''))!r}")
    ext = os.path.splitext(path)[1].lower()
    if extensions and ext not in extensions:
        raise InputError(f"{option} {path!r}: use a {' or '.join(extensions)} name for the {what}")
    for p in companions:
        if os.path.isdir(p):
            raise InputError(f"{option} {path!r}: {p!r}, written next to it, is a folder; remove it or choose "
                             f"another {option}")
    _check_folder_writable(os.path.dirname(os.path.abspath(path)), option, path)


def output_folder(path: str, option: str = "--out", contents: Iterable[str] = ()) -> None:
    """Check an output folder before the run: not a file, writable (existing or to be created),
    and none of the files it will hold (``contents``) is a folder."""
    if not path:
        raise InputError(f"{option}: give a folder name")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {path!r} is a file; this command writes a folder of results: give a folder "
                         "name")
    for name in contents:
        p = os.path.join(path, name)
        if os.path.isdir(p):
            raise InputError(f"{option} {path!r}: {p!r} is a folder where a file is written; remove it or choose "
                             f"another {option}")
    _check_folder_writable(path, option, path)


def input_file(path: str, option: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{option} {path!r} does not exist; check the path")
    if not os.path.isfile(path):
        raise InputError(f"{option} {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{option} {path!r} is empty")


@contextlib.contextmanager
def created_folders(folder: str):
    """Create ``folder`` (and missing parents) for the run; if the run fails, remove the folders this
    created that are still empty (a failed run leaves no empty output folder behind)."""
    created = []
    p = os.path.abspath(folder or ".")
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    if created:
        os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break
        raise


def remove_run_files(paths: Iterable[str]) -> None:
    """``--restart``: delete the checkpoint/storage files of this run (only these), if present."""
    for p in paths:
        if os.path.isfile(p):
            os.unlink(p)
            print(f"--restart: removed {p}")


@contextlib.contextmanager
def restart_hint(paths: Sequence[str], hint: str):
    """Turn a refused resume (a ValueError naming one of ``paths``) into an error that names the way
    out on the command line (``hint``: ``--restart`` or a new ``--out``)."""
    try:
        yield
    except ValueError as exc:
        msg = one_line(str(exc))
        if any(p and (repr(p) in msg or p in msg) for p in paths) and hint not in msg:
            cut = msg.find("; resume it with the same settings")  # the library's way out, said for the CLI
            msg = msg[:cut] + "; resume it with the same settings" if cut >= 0 else msg.rstrip(".")
            raise InputError(f"{msg}. {hint}") from None
        raise


def check_storage(storage: str, system, temperatures, flow=None, **settings) -> None:
    """A replica-exchange storage to resume must hold a run with these settings: checked read-only
    before the run (the sampler opens it for appending). ``settings``: the keywords passed to
    :func:`~openmm_flowpert.samplers.replica_exchange.run_replica_exchange` (its defaults otherwise)."""
    if not os.path.exists(storage):
        return
    import inspect
    import json

    from .._files import require_same_run
    from ..samplers import replica_exchange as rex

    try:
        make_config, key = rex._config, rex._CONFIG_KEY
    except AttributeError:  # pragma: no cover - the library's own check still runs when the run opens it
        return
    defaults = {k: p.default for k, p in inspect.signature(rex.run_replica_exchange).parameters.items()}
    kw = {k: settings.get(k, defaults[k]) for k in ("md_steps", "timestep_fs", "friction", "n_proposals",
                                                    "estimator", "prior_scale", "seed", "selection")}
    config = make_config(system, [float(t) for t in temperatures], flow, kw["md_steps"], kw["timestep_fs"],
                         kw["friction"], kw["n_proposals"], kw["estimator"], kw["prior_scale"], kw["seed"],
                         kw["selection"])
    from openmmtools import multistate

    try:
        reporter = multistate.MultiStateReporter(storage, open_mode="r")
    except Exception as exc:
        raise InputError(f"storage {storage!r} cannot be read ({type(exc).__name__}); delete it to start over")
    try:
        stored = json.loads(reporter.read_dict(key))
    except Exception:  # a storage written by something else
        stored = {}
    finally:
        reporter.close()
    require_same_run(storage, "replica-exchange", config, stored.get("kind"), stored.get("config"))


# -- inputs --------------------------------------------------------------------------------------------
def check_system(name: str) -> None:
    """A cheap check of ``--system`` before any work: a built-in name, or input files that exist
    (building the system comes later, in :func:`load_system`)."""
    from ..systems import SYSTEMS, get_system

    if name in SYSTEMS:
        return
    if name.endswith(".pdb"):
        input_file(name, "--system")
    elif ".prmtop" in name:
        prmtop, _, inpcrd = name.partition(":")
        for f in (prmtop, inpcrd or os.path.splitext(prmtop)[0] + ".inpcrd"):
            input_file(f, "--system")
    else:
        get_system(name)  # raises the error that names the built-in systems


def load_system(name: str, forcefield: Optional[Sequence[str]] = None):
    """:func:`openmm_flowpert.systems.get_system` with any failure to read or parametrize the input
    files reported as bad input naming ``--system``."""
    from ..systems import get_system

    for f in forcefield or ():
        if os.path.sep in f and not os.path.isfile(f):
            raise InputError(f"--forcefield file {f!r} does not exist")
    try:
        return get_system(name, forcefield)
    except ValueError:
        raise
    except Exception as exc:  # openmm's readers raise IndexError, KeyError, OpenMMException... on bad files
        msg = one_line(str(exc)) or type(exc).__name__
        raise InputError(f"--system {name!r} cannot be read or parametrized ({type(exc).__name__}: {msg}); "
                         "check the file (a complete PDB with hydrogens, or FILE.prmtop:FILE.inpcrd)") from None


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("openmm-flowpert")
    except Exception:
        import openmm_flowpert

        return getattr(openmm_flowpert, "__version__", "unknown")
