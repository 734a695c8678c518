"""Console output that suits where it goes: plain per-epoch lines in a log file, a summary without empty columns.

kdl swaps Lightning's redrawn progress bar for :class:`PlainProgress` when stderr is not a terminal (a log
file, a pipe, a ``kdl pipeline`` stage), and its model summary for :class:`QuietSummary`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar

from kd_lightning.progress import Throttle, write_progress

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class PlainProgress(ProgressBar):
    """One line per epoch (its validation metrics and time) instead of a redrawn bar.

    While an epoch runs it keeps ``epoch E/N step S/T`` in the progress file that ``kdl pipeline`` names
    (:mod:`kd_lightning.progress`), at most once a second, so the pipeline's status line follows the fit.
    """

    def __init__(self, stream: TextIO | None = None, every_s: float = 1.0) -> None:
        super().__init__()
        self.stream = stream
        self._enabled = True
        self._throttle = Throttle(every_s)
        self._epoch_t0 = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    @staticmethod
    def epoch_of(trainer: L.Trainer) -> str:
        """``E/N`` (1-based) or ``E`` when the number of epochs is open."""
        n = trainer.max_epochs
        return f"{trainer.current_epoch + 1}/{n}" if n is not None and n > 0 else str(trainer.current_epoch + 1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_t0 = time.monotonic()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,  # noqa: ANN401 - Lightning's hook signature
        batch: Any,  # noqa: ANN401 - Lightning's hook signature
        batch_idx: int,
    ) -> None:
        if trainer.is_global_zero and self._throttle():
            total = self.total_train_batches
            of = "?" if isinstance(total, float) and math.isinf(total) else str(int(total))
            write_progress(f"epoch {self.epoch_of(trainer)} step {batch_idx + 1}/{of}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        line = f"epoch {self.epoch_of(trainer)}  {format_metrics(trainer.callback_metrics, pl_module)}"
        line = f"{line.rstrip()}  ({time.monotonic() - self._epoch_t0:.1f} s)"
        self._print(line)
        write_progress(line)


def format_metrics(metrics: dict[str, Any], pl_module: L.LightningModule | None = None, limit: int = 6) -> str:
    """``train/loss 0.412  val/acc1 0.9231 ...``: the epoch's training loss, the model's monitor, other val/ metrics."""
    values: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            continue
    shown: dict[str, float] = {}
    loss = values.get("train/loss_epoch", values.get("train/loss"))
    if loss is not None:
        shown["train/loss"] = loss
    monitor = getattr(pl_module, "monitor", None)
    keys = [monitor] if monitor in values else []
    keys += sorted(k for k in values if k.startswith("val/") and not k.endswith("_step") and k != monitor)
    for key in keys:
        shown[key.removesuffix("_epoch")] = values[key]
    return "  ".join(f"{k} {v:.4g}" for k, v in list(shown.items())[:limit])


class QuietSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column when nothing was counted (no example input: all 0)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        if total_flops:
            ModelSummary.summarize(
                summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops
            )
            return
        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        log.info("\n" + "\n".join(ln for ln in table.splitlines() if "Total Flops" not in ln))


__all__ = ["PlainProgress", "QuietSummary", "format_metrics"]
