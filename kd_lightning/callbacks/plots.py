"""Learning curves as a PNG in the run folder, so a run can be looked at without a notebook or W&B.

kdl adds :class:`Curves` to every ``fit`` (``--curves.enabled false`` turns it off): at the end of the fit it
reads the run's ``metrics.csv`` and writes ``<default_root_dir>/plots/curves.png``: the losses, and the
validation metric the checkpoint is chosen on, per epoch.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger


def read_epochs(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """``metrics.csv`` as ``{metric: {epoch: value}}`` (epoch-level values; a metric's last value in an epoch)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(float(row.get("epoch") or ""))
            except ValueError:
                continue
            for key, text in row.items():
                if key in ("epoch", "step") or key.endswith("_step") or not text:
                    continue
                try:
                    out[key.removesuffix("_epoch")][epoch] = float(text)
                except ValueError:
                    continue
    return dict(out)


def plot_curves(metrics: dict[str, dict[int, float]], path: str | os.PathLike, title: str = "") -> Path | None:
    """Losses (left) and the validation metrics other than the loss (right) per epoch; None if nothing to draw."""
    from matplotlib.figure import Figure

    losses = sorted(k for k in metrics if k.endswith("/loss") and k.split("/")[0] in ("train", "val"))
    scores = [k for k in ("val/acc1", "val/mae", "val/f1", "val/ece") if k in metrics]
    if not any(len(metrics[k]) for k in losses + scores):
        return None
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
    for ax, keys, ylabel in ((axes[0], losses, "loss"), (axes[1], scores, "validation")):
        for key in keys:
            epochs = sorted(metrics[key])
            ax.plot([e + 1 for e in epochs], [metrics[key][e] for e in epochs], marker="o", ms=3, label=key)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


class Curves(L.Callback):
    """At the end of ``fit``, draw the run's learning curves into ``<default_root_dir>/plots/curves.png``.

    Args:
        enabled: draw them (needs a CSVLogger, kdl's default logger).
        filename: the PNG's path relative to the run folder.
    """

    def __init__(self, enabled: bool = True, filename: str = "plots/curves.png") -> None:
        super().__init__()
        self.enabled, self.filename = enabled, filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.enabled and trainer.is_global_zero) or getattr(trainer, "fast_dev_run", False):
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            return
        csv_logger.save()
        metrics_csv = Path(csv_logger.log_dir) / "metrics.csv"
        if not metrics_csv.is_file():
            return
        title = f"{type(pl_module).__name__} ({getattr(pl_module.hparams, 'net', '') or ''})".replace(" ()", "")
        self.path = plot_curves(read_epochs(metrics_csv), Path(trainer.default_root_dir) / self.filename, title)
        if self.path is not None:
            print(f"curves: {self.path}")


__all__ = ["Curves", "plot_curves", "read_epochs"]
