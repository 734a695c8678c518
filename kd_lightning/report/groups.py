"""Grouping runs (seeds of one recipe together) and what the groups show: the table and the curves' data."""

from __future__ import annotations

import statistics
from typing import Any

from kd_lightning.errors import ConfigError
from kd_lightning.report.runs import Run

#: metrics shown in percent
PERCENT_KEYS = ("acc", "f1", "ece", "err")


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
