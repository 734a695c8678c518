"""What ``kdl pipeline`` shows (doit's reporter): status lines, a running stage's progress, the results table.

Read from what the stages leave in their run folders (the progress file, the log, ``metrics.csv``, PNGs),
without importing torch: the pipeline stays a light process.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from kd_lightning.pipeline.schema import Step

from kd_lightning.progress import read_progress

#: the validation metric a fit is judged by, with its direction, in the order they are looked for
VAL_METRICS = (("val/acc1", "max"), ("val/mae", "min"), ("val/loss", "min"))
#: the test metrics the table shows first (the others follow, up to a few)
TEST_FIRST = ("test/acc1", "test/f1", "test/ece", "test/ece_ts", "test/mae")
#: a GAN's sample-quality metrics (GANQuality's ``quality.json``), in the order the table shows them
QUALITY_FIRST = ("quality/fid", "quality/intra_fid", "quality/label_consistency", "quality/label_mae")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def stage_progress(progress_path: str, log_path: str, since: float, width: int = 80) -> str:
    """A running stage's progress: its progress file when written since ``since``, else its log's last line."""
    text = read_progress(progress_path, since)
    if text is None:
        text = last_log_line(log_path)
    return text[:width] if len(text) > width else text


def last_log_line(path: str, tail_bytes: int = 8192) -> str:
    """The last non-empty line of a log (a progress bar's latest redraw counts as a line)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - tail_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [_ANSI.sub("", p).strip() for p in re.split(r"[\r\n]", text)]
    parts = [p for p in parts if p and not p.startswith("===")]
    return parts[-1] if parts else ""


def _metrics_files(run_dir: str, since: float) -> list[str]:
    found = glob.glob(os.path.join(glob.escape(run_dir), "**", "metrics.csv"), recursive=True)
    found = [p for p in found if os.sep + "pipeline" + os.sep not in p and os.path.getmtime(p) >= since]
    return sorted(found, key=os.path.getmtime)


def _rows(path: str) -> list[dict[str, float]]:
    out = []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                values = {}
                for k, v in row.items():
                    try:
                        values[k] = float(v)
                    except (TypeError, ValueError):
                        continue
                out.append(values)
    except OSError:
        return []
    return out


def gan_quality(run_dir: str, since: float = 0.0) -> dict[str, Any]:
    """The last point of a GAN's quality curve (``quality/*`` and its ``step``) from the newest ``quality.json``.

    GANQuality writes it under ``<run>/samples/`` (or its ``dirpath``, looked for anywhere under the run folder).
    Empty when there is none, or its last point has no quality metric (no teacher to measure with).
    """
    found = glob.glob(os.path.join(glob.escape(run_dir), "**", "quality.json"), recursive=True)
    found = [p for p in found if os.sep + "pipeline" + os.sep not in p and os.path.getmtime(p) >= since]
    for path in sorted(found, key=os.path.getmtime, reverse=True):
        try:
            with open(path) as f:
                history = json.load(f)
        except (OSError, ValueError):
            continue
        last = history[-1] if isinstance(history, list) and history and isinstance(history[-1], dict) else {}
        quality = {k: float(v) for k, v in last.items() if k.startswith("quality/") and isinstance(v, (int, float))}
        if quality:
            return {**quality, "step": int(last.get("step", 0))}
    return {}


def stage_results(command: str, run_dir: str, since: float = 0.0) -> dict[str, Any]:
    """A fit's best validation metric (and its epoch), or a test's metrics, from the newest ``metrics.csv``.

    A fit with no validation metric (a GAN) gives the last point of its quality curve (:func:`gan_quality`).
    ``since`` (epoch seconds): only files written by this run count. Empty when nothing is found.
    """
    files = _metrics_files(run_dir, since)
    if command == "fit":
        rows = [r for f in files for r in _rows(f)]
        for name, mode in VAL_METRICS:
            seen = [r for r in rows if name in r]
            if seen:
                best = (max if mode == "max" else min)(seen, key=lambda r: r[name])
                result: dict[str, Any] = {"metric": name, "value": best[name]}
                if "epoch" in best:
                    result["epoch"] = int(best["epoch"])
                return result
        return gan_quality(run_dir, since)
    if command in ("test", "validate"):
        prefix = f"{'test' if command == 'test' else 'val'}/"
        for path in reversed(files):
            rows = [r for r in _rows(path) if any(k.startswith(prefix) for k in r)]
            if rows:
                return {k: v for k, v in rows[-1].items() if k.startswith(prefix)}
    return {}


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def describe(command: str, results: dict[str, Any], limit: int = 5) -> str:
    """One table cell: ``best val/acc1 0.9722 (epoch 14)``, ``test/acc1 0.9583 ...``, ``last quality/fid 41.2 ...``."""
    if not results:
        return "(no metrics found)"
    if command == "fit" and "metric" not in results:  # a GAN: its last sample-quality point
        keys = [k for k in QUALITY_FIRST if k in results] + sorted(k for k in results if k not in QUALITY_FIRST)
        shown = "  ".join(f"{k} {_fmt(results[k])}" for k in keys if k.startswith("quality/"))
        return f"last {shown}" + (f" (step {results['step']})" if "step" in results else "")
    if command == "fit":
        epoch = f" (epoch {results['epoch']})" if "epoch" in results else ""
        return f"best {results['metric']} {_fmt(results['value'])}{epoch}"
    keys = [k for k in TEST_FIRST if k in results] + sorted(k for k in results if k not in TEST_FIRST)
    return "  ".join(f"{k} {_fmt(results[k])}" for k in keys[:limit])


def results_table(rows: list[tuple[str, str, str, dict[str, Any]]]) -> str:
    """A markdown table of ``(stage, command, run folder, results)`` rows (fits and tests; others are left out)."""
    kept = [r for r in rows if r[1] in ("fit", "test", "validate")]
    if not kept:
        return ""
    lines = ["| stage | command | result | run folder |", "|---|---|---|---|"]
    lines += [f"| {name} | {cmd} | {describe(cmd, res)} | {folder} |" for name, cmd, folder, res in kept]
    return "\n".join(lines)


def find_plots(folders: list[str]) -> list[str]:
    """The PNG files under the run folders, each once, in folder order."""
    found: list[str] = []
    for folder in dict.fromkeys(folders):
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.png"), recursive=True)):
            if path not in found:
                found.append(path)
    return found


class Console:
    """The pipeline's status lines: ``[i/n] name  state  detail``, one per event.

    On a terminal the running stage's line is redrawn in place with its progress; with several stages running
    at once (``--jobs``) one redrawn line lists them all, each with its time and progress, cut to the terminal.
    """

    def __init__(self, steps: list[Step], out: TextIO) -> None:
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.width, self.n = max(len(s.name) for s in steps), len(steps)

    def line(self, step: Step, state: str, detail: str = "", final: bool = True) -> None:
        text = f"[{step.index + 1:>{len(str(self.n))}}/{self.n}] {step.name:<{self.width}}  {state:<11} {detail}"
        text = text.rstrip()
        if self.tty:
            self.out.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        self.out.flush()

    def write(self, text: str) -> None:
        """A line of its own (above a live line on a terminal)."""
        self.out.write(("\r\033[K" if self.tty else "") + text)
        self.out.flush()

    def live(self, running: list[tuple[Step, str, float, float]]) -> None:
        """Redraw the live line (terminal only): ``(step, state, attempt start (epoch s), start (monotonic))``."""
        if not self.tty or not running:
            return
        columns = shutil.get_terminal_size((100, 20)).columns
        if len(running) == 1:
            step, state, since, t0 = running[0]
            width = max(20, columns - len(step.name) - 28)
            shown = stage_progress(step.progress_path, step.log_path, since, width=width)
            self.line(step, state, f"{time.monotonic() - t0:.0f} s  {shown or 'log: ' + step.log_path}", final=False)
            return
        each = max(12, (columns - 12) // len(running) - 3)
        parts = []
        for step, _, since, t0 in running:
            shown = stage_progress(step.progress_path, step.log_path, since, width=each)
            parts.append(f"{step.name} {time.monotonic() - t0:.0f} s {shown}".strip()[:each])
        text = f"running {len(running)}: " + " | ".join(parts)
        self.out.write("\r\033[K" + text[: columns - 1])
        self.out.flush()
