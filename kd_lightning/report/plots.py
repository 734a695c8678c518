"""Learning curves drawn with matplotlib (imported only when a curve is drawn): on a notebook's axes or to a PNG."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kd_lightning.fileio import atomic_write_bytes
from kd_lightning.report.groups import _scale, group_curves
from kd_lightning.report.runs import Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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
