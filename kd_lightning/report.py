"""``kdl report``: a table of runs (mean ± std over seeds) and their learning curves, from run folders alone.

    kdl report runs/evidence/distill/*/seed* --group-by parent --out docs/distill_report.md
    kdl report runs/sweeps/blkd_digits/sweep-*/* --group-by run        # one row per run

A run folder is a ``trainer.default_root_dir``: every ``lightning_logs/version_*/`` in it is read (the
``fit`` version has the curves, a later ``kdl test`` version the test metrics), with the ``config.yaml``
Lightning saved beside each ``metrics.csv``. Per run, the validation metrics are those of the epoch the
model's monitor picks (best ``val/acc1``, else lowest ``val/mae``, else lowest ``val/loss``), which is the
epoch ``best.ckpt`` holds; test metrics are the last ones logged. Nothing is trained and nothing is read
from the network: it works offline on any copy of the folders.

Grouping never averages runs of different recipes: the default (``method``) puts runs together only when their
model and data sections are the same except for the seed, and names a group by its method and net plus the keys
that tell it from its namesakes. A folder given that holds no Lightning logs at all (a sample store beside the
runs, a notes folder) is skipped and counted; a run whose files cannot be read is an error naming the file.
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

from jsonargparse import ArgumentParser

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.fileio import atomic_write_bytes, read_yaml

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
            run.config = _read_config(cfg_file)
        _read_metrics(version / "metrics.csv", run)
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


def _read_metrics(path: Path, run: Run) -> None:
    """Add the ``val/`` curves and the ``test/`` values of one ``metrics.csv`` to ``run``."""
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                epoch_text = row.get("epoch")
                epoch_value = _float(epoch_text) if epoch_text not in (None, "") else 0.0
                epoch = int(epoch_value) if epoch_value is not None else 0
                for key, text in row.items():
                    value = _float(text) if key not in (None, "epoch", "step") else None
                    if value is None or not isinstance(key, str):
                        continue
                    if key.startswith("test/"):
                        run.test[key] = value
                    elif key.startswith("val/"):
                        run.curves.setdefault(key, []).append((epoch, value))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{str(path)!r} is not a CSV metrics file: {e}") from None


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``lightning_logs`` folder (a run, finished or not)."""
    return (Path(path) / "lightning_logs").is_dir()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:  # noqa: ANN401 - a config tree
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    if isinstance(tree, list):
        out = {}
        for i, v in enumerate(tree):
            out |= _flat(v, f"{prefix}{i}.")
        return out or {prefix[:-1]: "[]"}
    return {prefix[:-1]: tree}


def recipe_identity(run: Run) -> dict[str, Any]:
    """The run's model and data settings, flattened (``model.init_args.net`` -> value): what seeds share."""
    return {k: v for k, v in _flat({s: run.config.get(s) for s in ("model", "data")}).items()}


def _short(key: str) -> str:
    """``model.init_args.kd_losses.0.init_args.T`` -> ``T``: the last part that is not a list index."""
    parts = [p for p in key.split(".") if not p.isdigit() and p != "init_args"]
    return parts[-1] if parts else key


def group_runs(runs: list[Run], by: str) -> dict[str, list[Run]]:
    """The runs grouped under ``by`` (see :func:`group_key`), groups and members in the order first seen.

    ``method`` first groups by method and net, then splits a group whose model or data settings differ other than
    by seed, naming each part by the keys that differ (``DistillModule[BLKD] resnet8 (T=2)``).
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run, by), []).append(run)
    if by != "method":
        return groups
    out: dict[str, list[Run]] = {}
    for name, members in groups.items():
        identities = [recipe_identity(r) for r in members]
        keys = sorted({k for ident in identities for k in ident})
        differing = [k for k in keys if len({repr(ident.get(k)) for ident in identities}) > 1]
        if not differing:
            out[name] = members
            continue
        for run, ident in zip(members, identities):
            label = ", ".join(f"{_short(k)}={ident.get(k)}" for k in differing)
            out.setdefault(f"{name} ({label})", []).append(run)
    return out


def group_key(run: Run, by: str) -> str:
    """Return the group of ``run`` under ``by``.

    ``by`` is ``method`` (model class, KD losses and net; :func:`group_runs` splits it further by recipe),
    ``run`` (the run folder itself), ``parent`` (the run folder's parent's name), ``name`` (the run folder's own
    name: ``<root>/seed<k>/<arm>`` layouts), ``none``, or a dotted config key
    such as ``model.init_args.net``.
    """
    if by == "method":
        net = ((run.config.get("model") or {}).get("init_args") or {}).get("net")
        return f"{run.method()} {net}" if isinstance(net, str) else run.method()
    if by == "run":
        return str(run.path)
    if by == "parent":
        return run.path.resolve().parent.name
    if by == "name":  # <root>/seed<k>/<arm> layouts: one row per arm over the seeds
        return run.path.resolve().name
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
    groups = group_runs(runs, by)
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
    for name, members in group_runs(runs, by).items():
        for run in members:
            points = dict(run.curves.get(metric) or [])  # the last value logged at an epoch wins
            for epoch, value in points.items():
                out.setdefault(name, {}).setdefault(epoch, []).append(_scale(metric) * value)
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
    """Build ``kdl report``'s argument parser (flags in :mod:`kd_lightning.flags`' convention)."""
    p = ArgumentParser(prog="kdl report", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("runs", nargs="+", type=str, help="run folders (trainer.default_root_dir of each run)")
    p.add_argument("--group_by", type=str, default="method",
                   help="method (same recipe but the seed), run (one row per run), parent, name (the run "
                        "folder's own name: seed<k>/<arm> layouts), none, "
                        "or a dotted config key (e.g. model.init_args.net)")  # fmt: skip
    p.add_argument("--metrics", type=str, default=None, help="comma-separated metrics (default: all val/ and test/)")
    p.add_argument("--out", type=str, default=None,
                   help="write the table (markdown) and its curves beside it; creates at most one folder")  # fmt: skip
    p.add_argument("--title", type=str, default="", help="a line above the table (budget, seeds, data ...)")
    p.add_argument("--quiet", type=bool, default=False, help="no progress output (a flag; also takes true/false)")
    return p


#: old spellings still accepted
ALIASES = {"--group-by": "--group_by"}


def read_runs(folders: list[str], quiet: bool = True) -> tuple[list[Run], list[str]]:
    """The runs of ``folders`` and the folders skipped because they hold no Lightning logs (not runs).

    A path that does not exist is an error (a typo); a file or a folder without ``lightning_logs`` is skipped; a
    run whose logs cannot be read is an error naming the file. No run at all is an error too.
    """
    from tqdm.auto import tqdm

    runs, skipped = [], []
    for folder in tqdm(folders, desc="reading runs", unit="run", disable=quiet):
        if Path(folder).exists() and not is_run_folder(folder):
            skipped.append(folder)
            continue
        runs.append(read_run(folder))
    if not runs:
        names = ", ".join(repr(f) for f in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        raise ConfigError(
            f"no run among {len(skipped)} path(s) ({names}): each has no lightning_logs/version_*/metrics.csv; "
            "expected trainer.default_root_dir folders"
        )
    return runs, skipped


def output_path(out: str) -> Path:
    """``--out``'s file; its folder is created only when that folder's parent exists (never a whole tree)."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out!r} is a folder; expected a markdown file name (e.g. {out}/report.md)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        if folder.exists():
            raise ConfigError(f"--out {out!r}: {str(folder)!r} is a file, not a folder")
        if not folder.parent.is_dir():
            raise ConfigError(f"--out {out!r}: folder {str(folder.parent)!r} does not exist; create it first "
                              "(kdl report creates only the last folder of --out)")  # fmt: skip
        try:
            folder.mkdir()
        except OSError as e:
            raise ConfigError(f"--out {out!r}: cannot create folder {str(folder)!r}: {e.strerror}") from None
    return path


def write_report(runs: list[Run], by: str, text: str, out: str) -> str:
    """Write ``text`` and the curves of the first monitor to ``out``; return the text with the figure linked."""
    path = output_path(out)
    try:
        for m in [m for m, _ in MONITORS if any(r.curves.get(m) for r in runs)][:1]:
            png = path.with_name(f"{path.stem}_{m.replace('/', '_')}.png")
            if plot_curves(runs, by, m, png):
                text += f"\n\n![{m} per epoch]({png.name})"
        atomic_write_bytes(path, (text + "\n").encode())
    except OSError as e:
        raise ConfigError(f"--out {out!r}: cannot write there: {e.strerror or e}") from None
    return text


def main(argv: list[str] | None = None) -> int:
    """Run ``kdl report``; return the exit status."""
    from kd_lightning.flags import normalize

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(normalize(argv, bools=["--quiet"], aliases=ALIASES))
    except Exception as e:  # noqa: BLE001 - jsonargparse reports usage errors as exceptions here
        print(f"kdl report: error: {e}", file=sys.stderr)
        return 2
    try:
        runs, skipped = read_runs(args.runs, quiet=args.quiet)
        if skipped:
            shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
            print(
                f"kdl report: skipped {len(skipped)} path(s) that are not runs (no lightning_logs): {shown}",
                file=sys.stderr,
            )
        metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
        text = table(runs, args.group_by, metrics)
        if args.title:
            text = f"{args.title}\n\n{text}"
        if args.out:
            text = write_report(runs, args.group_by, text, args.out)
        print(text)
    except KDLError as e:
        print(f"kdl report: error: {e}", file=sys.stderr)
        return 2
    return 0
