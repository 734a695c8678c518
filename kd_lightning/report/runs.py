"""Reading run folders: a run's config, its validation curves, the epoch its monitor picks and its test metrics.

A run folder is a ``trainer.default_root_dir``: its ``lightning_logs/version_*/`` folders are read (a ``fit``
version has the curves, a later ``kdl test`` version the test metrics), with the ``config.yaml`` Lightning saved
beside each ``metrics.csv``. A fit version is one whose ``metrics.csv`` has ``train/`` columns. When ``kdl fit``
ran into the folder more than once, only the newest fit counts: its version, the versions that resume it
(``ckpt_path`` set, or epochs not starting at 0) and the test versions after it; older fits and their tests are
left out (``all_versions=True`` reads every version). When the newest fit has no test after it but an older fit
has, that test is left out and :attr:`Run.notes` says so. Per run, the validation metrics are those of the epoch
the model's monitor picks (best ``val/acc1``, else lowest ``val/mae``, else lowest ``val/loss``), which is the
epoch ``best.ckpt`` holds; test metrics are the last ones logged. A folder given that holds no Lightning logs
at all is skipped by :func:`read_runs`; a run whose files cannot be read is an error naming the file.
"""

from __future__ import annotations

import csv
import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_lightning.errors import ConfigError
from kd_lightning.fileio import read_yaml

#: validation metrics that select the epoch, in order of preference, with their direction
MONITORS = (("val/acc1", max), ("val/mae", min), ("val/loss", min))


@dataclass
class Run:
    """One run folder: its config, per-epoch validation rows and final test metrics."""

    path: Path
    config: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    test: dict[str, float] = field(default_factory=dict)
    selected: dict[str, float] = field(default_factory=dict)  # validation metrics at the selected epoch
    notes: list[str] = field(default_factory=list)  # what a reader should know (a test left out as ambiguous)

    @property
    def seed(self) -> int | None:
        return self.config.get("seed_everything")

    def method(self) -> str:
        return method_name(self.config.get("model") or {})


def method_name(model: dict[str, Any]) -> str:
    """A model section's class, with its KD losses for a distiller (``DistillModule[BLKD+CRD]``)."""
    name = str(model.get("class_path", "?")).rsplit(".", 1)[-1]
    losses = (model.get("init_args") or {}).get("kd_losses") or []
    names = [str(x.get("class_path", x)).rsplit(".", 1)[-1] for x in losses if isinstance(x, dict)]
    return f"{name}[{'+'.join(names)}]" if names else name


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def read_run(path: str | os.PathLike, all_versions: bool = False) -> Run:
    """Read a run folder (see the module docstring); a clear error when it holds no Lightning logs."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise ConfigError(f"run folder {str(path)!r} {state}; expected a trainer.default_root_dir")
    versions = sorted(
        (p for p in path.glob("lightning_logs/version_*") if (p / "metrics.csv").is_file()),
        key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1,
    )
    if not versions:
        raise ConfigError(f"run folder {str(path)!r} has no lightning_logs/version_*/metrics.csv (CSV logger)")
    run = Run(path=path, config={})
    parts = {v: _read_metrics(v / "metrics.csv") for v in versions}
    chosen = versions if all_versions else _newest_fit(path, versions, parts, run.notes)
    for version in chosen:
        cfg_file = version / "config.yaml"
        if cfg_file.is_file() and not run.config:
            run.config = _read_config(cfg_file)
        curves, test, _ = parts[version]
        for key, points in curves.items():
            run.curves.setdefault(key, []).extend(points)
        run.test.update(test)
    if not run.config and (path / "config.yaml").is_file():  # a W&B-first run: Lightning saved it in the logger's dir
        run.config = _read_config(path / "config.yaml")
    if not run.curves and not run.test:
        files = ", ".join(repr(str(v / "metrics.csv")) for v in versions)
        raise ConfigError(f"run folder {str(path)!r}: {files} hold(s) no numeric val/ or test/ metrics (empty?)")
    for monitor, pick in MONITORS:
        if run.curves.get(monitor):
            best_epoch = pick(run.curves[monitor], key=lambda ev: ev[1])[0]
            run.selected = {
                k: v for k, points in run.curves.items() for e, v in points if e == best_epoch
            }  # the last value logged at that epoch wins
            run.selected["val/epoch"] = float(best_epoch)
            break
    return run


def _read_config(path: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a mapping; a clear error when it is not YAML or not a mapping."""
    config = read_yaml(path, repr(str(path)))
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{str(path)!r} holds a {type(config).__name__}; expected the config mapping Lightning saved")
    return config


#: what one ``metrics.csv`` holds: its val/ curves (metric -> [(epoch, value)]), its last test/ values and its
#: first epoch (None without rows)
Metrics = tuple[dict[str, list[tuple[int, float]]], dict[str, float], int | None]


def _read_metrics(path: Path) -> Metrics:
    """The ``val/`` curves, the ``test/`` values and the first epoch of one ``metrics.csv``."""
    curves: dict[str, list[tuple[int, float]]] = {}
    test: dict[str, float] = {}
    first: int | None = None
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                epoch_text = row.get("epoch")
                epoch_value = _float(epoch_text) if epoch_text not in (None, "") else 0.0
                epoch = int(epoch_value) if epoch_value is not None else 0
                first = epoch if first is None else min(first, epoch)
                for key, text in row.items():
                    value = _float(text) if key not in (None, "epoch", "step") else None
                    if value is None or not isinstance(key, str):
                        continue
                    if key.startswith("test/"):
                        test[key] = value
                    elif key.startswith("val/"):
                        curves.setdefault(key, []).append((epoch, value))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{str(path)!r} is not a CSV metrics file: {e}") from None
    return curves, test, first


def _is_fit(version: Path) -> bool:
    """Whether a version was written by a fit: its ``metrics.csv`` has ``train/`` columns (a test's has not)."""
    try:
        with open(version / "metrics.csv", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return any(h.startswith("train/") for h in header)


def _resumes(version: Path, metrics: Metrics) -> bool:
    """Whether a fit version continues the one before: started from a checkpoint, or its epochs do not start at 0."""
    if metrics[2] is not None and metrics[2] > 0:
        return True
    cfg_file = version / "config.yaml"
    return cfg_file.is_file() and bool(_read_config(cfg_file).get("ckpt_path"))


def _newest_fit(
    path: Path,
    versions: list[Path],
    parts: dict[Path, Metrics],
    notes: list[str],
) -> list[Path]:
    """The versions of the newest fit: from its first version (a fresh fit, not a resume) to the end.

    Versions before the first fit stay with it (a folder with one fit reads as it always did). A test version
    that follows an older fit is that fit's; when the newest fit has no test of its own it is left out, noted.
    """
    starts = [
        i
        for i, v in enumerate(versions)
        if i > 0 and _is_fit(v) and any(_is_fit(u) for u in versions[:i]) and not _resumes(v, parts[v])
    ]
    if not starts:
        return versions
    chosen, older = versions[starts[-1] :], versions[: starts[-1]]
    if not any(parts[v][1] for v in chosen) and any(parts[v][1] for v in older):
        tested = [v.name for v in older if parts[v][1]]
        notes.append(
            f"run folder {str(path)!r}: its newest fit ({chosen[0].name}) has no test version after it; the test "
            f"in {', '.join(tested)} belongs to an older fit and is left out (--all_versions reads every version)"
        )
    return chosen


def expand_patterns(paths: list[str]) -> list[str]:
    """Each path as given, or the sorted matches of a glob pattern (a quoted ``runs/demo/*``); none is an error."""
    out: list[str] = []
    for arg in paths:
        if os.path.exists(arg) or not glob.has_magic(arg):
            out.append(arg)
            continue
        matches = sorted(glob.glob(arg))
        if not matches:
            raise ConfigError(f"run pattern {arg!r} matches nothing; expected run folders (trainer.default_root_dir)")
        out += matches
    return out


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``lightning_logs`` folder (a run, finished or not)."""
    return (Path(path) / "lightning_logs").is_dir()


#: fewer runs than this are read without a progress bar
PROGRESS_MIN_RUNS = 20


def read_runs(folders: list[str], quiet: bool = True, all_versions: bool = False) -> tuple[list[Run], list[str]]:
    """The runs of ``folders`` and the folders skipped because they hold no Lightning logs (not runs).

    A path that does not exist is an error (a typo); a file or a folder without ``lightning_logs`` is skipped; a
    run whose logs cannot be read is an error naming the file. No run at all is an error too. Unless ``quiet``, a
    progress bar shows on a terminal (stderr) while many runs (``PROGRESS_MIN_RUNS``) are read.
    """
    import sys

    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    runs, skipped = [], []
    with tqdm(
        folders, desc="reading runs", unit="run", disable=quiet or not tty or len(folders) < PROGRESS_MIN_RUNS
    ) as bar:
        for folder in bar:
            if Path(folder).exists() and not is_run_folder(folder):
                skipped.append(folder)
                continue
            runs.append(read_run(folder, all_versions=all_versions))
    if not runs:
        names = ", ".join(repr(f) for f in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        raise ConfigError(
            f"no run among {len(skipped)} path(s) ({names}): each has no lightning_logs/version_*/metrics.csv; "
            "expected trainer.default_root_dir folders"
        )
    return runs, skipped
