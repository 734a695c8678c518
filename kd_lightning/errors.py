"""Errors that are the user's to fix.

The ``kdl`` command prints these as one short message (no traceback unless ``KDL_DEBUG=1`` or
``--debug``), so every message names the bad value and what was expected.
"""


class KDLError(Exception):
    """Base class of every error the user can fix (bad config, missing data, wrong checkpoint)."""


class ConfigError(KDLError, ValueError):
    """A recipe or argument value is invalid."""


class DataNotFoundError(KDLError, FileNotFoundError):
    """A dataset's files are missing or malformed under the given root."""


class CheckpointError(KDLError):
    """A checkpoint is missing, unreadable, or of the wrong kind."""
