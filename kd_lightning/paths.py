"""Where relative paths of the notebooks and tools point: the project root, not the current folder.

A Jupyter kernel starts in the notebook's folder (``notebooks/``), papermill and nbconvert wherever they are
called from: a relative input such as ``runs/demo/teacher`` would mean something different each time. It is
resolved against :func:`project_root` instead: ``$KDL_PROJECT_ROOT`` when set, else the repository this package
is checked out in (the folder holding ``pyproject.toml`` beside ``kd_lightning/``), else the current folder.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

#: environment variable naming the folder that relative inputs are resolved against
ROOT_ENV = "KDL_PROJECT_ROOT"


def project_root() -> Path:
    """``$KDL_PROJECT_ROOT``, else the repository holding this package, else the current folder (absolute)."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "kd_lightning").is_dir():
        return repo
    return Path.cwd()


def resolve(path: str | os.PathLike) -> Path:
    """``path`` made absolute against :func:`project_root` (an absolute path, or ``~/...``, is kept)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def expand(patterns: str | list[str]) -> list[Path]:
    """Comma-separated (or listed) folders and glob patterns, resolved by :func:`resolve`, sorted, no duplicates.

    A pattern that matches nothing contributes nothing; a plain path is kept whether it exists or not (the caller
    names what is missing).
    """
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    out: dict[Path, None] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        full = resolve(item)
        for match in sorted(glob.glob(str(full))) if glob.has_magic(str(full)) else [str(full)]:
            out[Path(match)] = None
    return list(out)
