"""Errors that are the user's to fix.

The ``kdl`` command prints these as one short message (no traceback unless ``KDL_DEBUG=1`` or
``--debug``), so every message names the bad value and what was expected.
"""

from __future__ import annotations

import os


class KDLError(Exception):
    """Base class of every error the user can fix (bad config, missing data, wrong checkpoint)."""


class ConfigError(KDLError, ValueError):
    """A recipe or argument value is invalid."""


class DataNotFoundError(KDLError, FileNotFoundError):
    """A dataset's files are missing or malformed under the given root."""


class DataCorruptError(DataNotFoundError):
    """One file of a dataset that is otherwise there cannot be decoded (the error names it)."""


class CheckpointError(KDLError):
    """A checkpoint is missing, unreadable, or of the wrong kind."""


def require_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Refuse, naming ``path``, a run folder that is a file, sits under a file, or cannot be written.

    The folder need not exist yet: its nearest existing ancestor must be a writable folder.
    """
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"lies under {probe!r}, a file"
        raise ConfigError(f"{what} {str(path)!r} {where}; expected a folder to write the run in")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r}: {probe!r} is not writable; expected a folder you can write to")
