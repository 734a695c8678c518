"""What the benchmark scripts share: the quiet-trainer arguments and the report writer.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they import it as
``from common import ...``.
"""

from __future__ import annotations

from pathlib import Path

#: no progress bar and no model summary: a benchmark prints its own lines
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
#: ``QUIET`` and no logger (timing runs that keep nothing)
NO_LOGGER = ["--trainer.logger", "false", *QUIET]
#: no checkpoint written (timing runs)
NO_CHECKPOINTS = ["--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]


def report(text: str, out: Path | None, heading: str) -> str:
    """Print ``text`` and, when ``out`` is given, write it there under a ``# heading`` (folders made)."""
    print("\n" + text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {heading}\n\n{text}\n")
    return text
