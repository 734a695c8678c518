"""Files written atomically: a reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_replace(path: str | os.PathLike, write: Callable[[str], None], tmp: str | None = None) -> None:
    """``write(tmp)`` fills a temporary file in ``path``'s folder, which then replaces ``path`` (``os.replace``).

    ``tmp`` defaults to a fresh ``.tmp-*`` name with the usual permissions (0666 less the umask). If anything
    fails, the temporary file is removed and ``path`` is untouched. ``write`` should flush and fsync its file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then ``os.replace``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_replace(path, write)


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in ``folder`` (made when missing), or ``None``: a file on the way, no write access.

    Catches the common mistakes before hours of work; a full disk or a read-only mount still fails at the write.
    """
    path = os.path.abspath(folder)
    while True:
        if os.path.exists(path):
            if not os.path.isdir(path):
                return f"{path!r} is a file, not a folder"
            if not os.access(path, os.W_OK):
                return f"the folder {path!r} is not writable"
            return None
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def read_yaml(path: str | os.PathLike, what: str) -> Any:  # noqa: ANN401 - any YAML document
    """Parse a YAML file; a syntax error becomes one :class:`ConfigError` naming ``what``, the line and the column."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{what} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
