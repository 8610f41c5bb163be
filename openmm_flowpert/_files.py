"""Atomic file writes (every file this package writes appears complete or not at all) and the one
checkpoint format: a payload tagged with the run's kind and configuration, refused on a mismatch."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, List, Optional


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name keeps ``suffix`` (libraries that pick a format from the extension need it)
    and gets the usual permissions (0666 minus the umask) before the rename; it is removed if
    ``write`` fails.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="flowpert-tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_differences(stored: dict, config: dict) -> List[str]:
    """``"key: stored there, new now"`` for every setting in which two run configurations differ."""
    keys = list(config) + [k for k in stored if k not in config]
    def there(k: str) -> str:
        return repr(stored[k]) if k in stored else "not recorded (the default of the version that wrote it)"

    return [f"{k}: {there(k)} there, {config.get(k)!r} now" for k in keys if stored.get(k) != config.get(k)]


def require_same_run(path: str, kind: str, config: dict, stored_kind: Optional[str], stored_config: dict) -> None:
    """Refuse to resume ``path`` unless it holds a run of the same ``kind`` and configuration.

    The error names the settings that differ and the fix (the same settings, or a new output).
    """
    if stored_kind != kind:
        raise ValueError(f"{path!r} holds a {stored_kind or 'foreign'} run, not a {kind} run; delete it or choose "
                         "another output")
    diff = config_differences(stored_config or {}, config)
    if diff:
        raise ValueError(f"{path!r} holds a {kind} run with other settings ({'; '.join(diff)}); resume it with the "
                         "same settings, or delete it / choose another output to start a new run")


def save_checkpoint(path: str, kind: str, config: dict, payload: dict) -> None:
    """Write a checkpoint atomically: ``payload`` tagged with the run's ``kind``, ``config`` and the
    noise backend that drew its random numbers (a resume with another backend is warned about)."""
    import torch

    from .noise import BACKEND_KEY, backend

    record = {"kind": kind, "config": config, BACKEND_KEY: backend(), **payload}
    atomic_write(path, lambda tmp: torch.save(record, tmp), suffix=".pt")


def load_checkpoint(path: Optional[str], kind: str, config: dict) -> Optional[dict]:
    """The checkpoint at ``path`` if it exists (None otherwise), after :func:`require_same_run`.

    An unreadable file raises a one-line ``ValueError`` naming it; a file written with another
    noise backend gives a warning (seeded results then differ from an uninterrupted run).
    """
    if path is None or not os.path.exists(path):
        return None
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}); delete it to start "
                         "over") from None
    if not isinstance(ck, dict):
        raise ValueError(f"{path!r} is not a flowpert checkpoint; delete it or choose another output")
    require_same_run(path, kind, config, ck.get("kind"), ck.get("config"))
    from .noise import BACKEND_KEY, check_backend

    check_backend(ck.get(BACKEND_KEY), f"checkpoint {path!r}")
    return ck

