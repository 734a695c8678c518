"""``kdl report``: a table of runs (mean ± std over seeds) and their learning curves, from run folders alone.

    kdl report runs/evidence/distill/*/seed* --group-by parent --out docs/distill_report.md

A run folder is a ``trainer.default_root_dir``: every ``lightning_logs/version_*/`` in it is read (the
``fit`` version has the curves, a later ``kdl test`` version the test metrics), with the ``config.yaml``
Lightning saved beside each ``metrics.csv``. Per run, the validation metrics are those of the epoch the
model's monitor picks (best ``val/acc1``, else lowest ``val/mae``, else lowest ``val/loss``), which is the
epoch ``best.ckpt`` holds; test metrics are the last ones logged. Nothing is trained and nothing is read
from the network: it works offline on any copy of the folders.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from jsonargparse import ArgumentParser

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: validation metrics that select the epoch, in order of preference, with their direction
MONITORS = (("val/acc1", max), ("val/mae", min), ("val/loss", min))
#: metrics shown in percent
PERCENT_KEYS = ("acc", "f1", "ece", "err")


@dataclass
class Run:
    """One run folder: its config, per-epoch validation rows and final test metrics."""

    path: Path
    config: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    test: dict[str, float] = field(default_factory=dict)
    selected: dict[str, float] = field(default_factory=dict)  # validation metrics at the selected epoch

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


def read_run(path: str | os.PathLike) -> Run:
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
    for version in versions:
        cfg_file = version / "config.yaml"
        if cfg_file.is_file() and not run.config:
            run.config = yaml.safe_load(cfg_file.read_text()) or {}
        with open(version / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                epoch = int(float(row.get("epoch") or 0)) if row.get("epoch") not in (None, "") else 0
                for key, text in row.items():
                    value = _float(text) if key not in ("epoch", "step") else None
                    if value is None:
                        continue
                    if key.startswith("test/"):
                        run.test[key] = value
                    elif key.startswith("val/"):
                        run.curves.setdefault(key, []).append((epoch, value))
    for monitor, pick in MONITORS:
        if run.curves.get(monitor):
            best_epoch = pick(run.curves[monitor], key=lambda ev: ev[1])[0]
            run.selected = {
                k: v for k, points in run.curves.items() for e, v in points if e == best_epoch
            }  # the last value logged at that epoch wins
            run.selected["val/epoch"] = float(best_epoch)
            break
    return run


def group_key(run: Run, by: str) -> str:
    """Return the group of ``run`` under ``by``.

    ``by`` is ``method`` (model class and KD losses), ``parent`` (the run folder's parent's name), ``none``,
    or a dotted config key such as ``model.init_args.net``.
    """
    if by == "method":
        return run.method()
    if by == "parent":
        return run.path.resolve().parent.name
    if by == "none":
        return "all"
    value: Any = run.config
    for part in by.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"--group-by {by!r}: run {str(run.path)!r} has no config key {part!r}")
        value = value[part]
    return str(value)


def _scale(metric: str) -> float:
    return 100.0 if any(k in metric.rsplit("/", 1)[-1] for k in PERCENT_KEYS) else 1.0


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std, n - 1); the mean alone for one value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(runs: list[Run], by: str, metrics: list[str] | None = None) -> str:
    """The markdown table: one row per group, mean ± std over its runs for every metric."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run, by), []).append(run)
    if metrics is None:
        val = sorted({k for r in runs for k in r.selected if k != "val/epoch"})
        test = sorted({k for r in runs for k in r.test})
        metrics = val + test
    header = ["group", "runs", "seeds", *[f"{m} (%)" if _scale(m) == 100 else m for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---|" + "---:|" * len(metrics)]
    for name, members in groups.items():
        cells = [name, str(len(members)), ", ".join(str(r.seed) for r in members)]
        for m in metrics:
            values = [_scale(m) * v for r in members for v in [r.selected.get(m, r.test.get(m))] if v is not None]
            partial = f" (n={len(values)})" if values and len(values) < len(members) else ""  # e.g. a run not tested
            cells.append(mean_std(values) + partial if values else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_curves(runs: list[Run], by: str, metric: str) -> dict[str, dict[int, list[float]]]:
    """``group -> epoch -> [value of each run]`` of ``metric`` (scaled to % where it is a rate), in run order."""
    out: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        points = dict(run.curves.get(metric) or [])  # the last value logged at an epoch wins
        for epoch, value in points.items():
            out.setdefault(group_key(run, by), {}).setdefault(epoch, []).append(_scale(metric) * value)
    return out


def draw_curves(ax: Axes, runs: list[Run], by: str, metric: str) -> bool:
    """Draw ``metric`` per epoch on a matplotlib ``ax``: one line per group (the mean of its runs), min-max shaded.

    Up to 10 groups take matplotlib's default colours, up to 20 ``tab20``'s; beyond that the line styles vary
    too. With more than 6 groups the legend sits outside the axes, on the right. ``ax`` is a notebook's
    figure, or :func:`plot_curves`' file. Returns False when no run logged ``metric``.
    """
    groups = group_curves(runs, by, metric)
    if not groups:
        return False
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    styles = ("-", "--", ":", "-.")
    for k, (name, by_epoch) in enumerate(groups.items()):
        epochs = sorted(by_epoch)
        values = [by_epoch[e] for e in epochs]
        colour = cmap(k % cmap.N)
        ax.plot(epochs, [sum(v) / len(v) for v in values], color=colour, ls=styles[(k // cmap.N) % 4], label=name)
        if any(len(v) > 1 for v in values):
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)" if _scale(metric) == 100 else metric)
    ax.grid(alpha=0.3)
    if len(groups) > 6:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax.legend(fontsize=8)
    return True


def plot_curves(runs: list[Run], by: str, metric: str, path: str | os.PathLike) -> bool:
    """A PNG of :func:`draw_curves`; False (and no file) when no run logged ``metric``."""
    import io

    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if not draw_curves(ax, runs, by, metric):
        return False
    if len(ax.get_lines()) > 6:  # one line per group; the legend sits on the right
        fig.set_size_inches(7.5, 4)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return True


def build_parser() -> ArgumentParser:
    """Build ``kdl report``'s argument parser."""
    p = ArgumentParser(prog="kdl report", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("runs", nargs="+", type=str, help="run folders (trainer.default_root_dir of each run)")
    p.add_argument("--group-by", "--group_by", dest="group_by", type=str, default="method",
                   help="method, parent, none, or a dotted config key (e.g. model.init_args.net)")  # fmt: skip
    p.add_argument("--metrics", type=str, default=None, help="comma-separated metrics (default: all val/ and test/)")
    p.add_argument("--out", type=str, default=None, help="write the table here (markdown) and the curves beside it")
    p.add_argument("--title", type=str, default="", help="a line above the table (budget, seeds, data ...)")
    p.add_argument("--quiet", type=bool, default=False, help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``kdl report``; return the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except Exception as e:  # noqa: BLE001 - jsonargparse reports usage errors as exceptions here
        print(f"kdl report: error: {e}", file=sys.stderr)
        return 2
    try:
        from tqdm.auto import tqdm

        runs = [read_run(f) for f in tqdm(args.runs, desc="reading runs", unit="run", disable=args.quiet)]
        metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
        text = table(runs, args.group_by, metrics)
        if args.title:
            text = f"{args.title}\n\n{text}"
        if args.out:
            out = Path(args.out)
            monitors = [m for m, _ in MONITORS if any(r.curves.get(m) for r in runs)][:1]
            for m in monitors:
                png = out.with_name(f"{out.stem}_{m.replace('/', '_')}.png")
                if plot_curves(runs, args.group_by, m, png):
                    text += f"\n\n![{m} per epoch]({png.name})"
            atomic_write_bytes(out, (text + "\n").encode())
        print(text)
    except KDLError as e:
        print(f"kdl report: error: {e}", file=sys.stderr)
        return 2
    return 0
