"""A one-line progress file that a stage writes and ``kdl pipeline`` shows on its status line.

``kdl pipeline`` sets :data:`PROGRESS_ENV` to a file per stage; a running command (a fit's progress
callback, any long job) calls :func:`write_progress` with a short line (``epoch 3/15 step 40/120``).
Without the variable nothing is written. Kept free of torch and Lightning: the pipeline reads it.
"""

from __future__ import annotations

import os
import time

#: environment variable naming the progress file (set by ``kdl pipeline`` for each stage it runs)
PROGRESS_ENV = "KDL_PROGRESS_FILE"


def write_progress(text: str) -> None:
    """Replace the progress file's line with ``text`` (atomically); a no-op when no file is named."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text.strip().replace("\n", " ") + "\n")
        os.replace(tmp, path)
    except OSError:  # progress is a courtesy: never fail a run over it
        pass


def read_progress(path: str, since: float = 0.0) -> str | None:
    """The progress line in ``path`` if it was written at or after ``since`` (epoch seconds), else None."""
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path, errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


class Throttle:
    """True at most once per ``seconds`` (the first call is always True)."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds, self.last = seconds, float("-inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True
