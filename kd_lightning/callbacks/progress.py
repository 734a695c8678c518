"""Console output that suits where it goes: plain per-epoch lines in a log file, a summary without empty columns.

kdl swaps Lightning's redrawn progress bar for :class:`PlainProgress` when stderr is not a terminal (a log
file, a pipe, a ``kdl pipeline`` stage), and its model summary for :class:`QuietSummary` (:func:`quiet_console`);
:func:`quiet_lightning` silences Lightning's warnings and info lines that are noise for kdl users.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import warnings
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar

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


__all__ = ["PlainProgress", "QuietSummary", "format_metrics", "quiet_console", "quiet_lightning"]


def quiet_console(callbacks: list[L.Callback]) -> None:
    """Swap Lightning's console callbacks for kdl's: no FLOPs column of zeros; plain lines when stderr is no terminal.

    A redrawn progress bar written into a log file is megabytes of carriage returns; there one line per epoch says
    more. ``KDL_PROGRESS=bar`` keeps the bar, ``KDL_PROGRESS=plain`` forces the lines.
    """
    from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar

    choice = os.environ.get("KDL_PROGRESS", "")
    plain = choice == "plain" or (choice != "bar" and not sys.stderr.isatty())
    # Lightning picks the Rich variants by default when the `rich` package happens to be installed (a dependency
    # of other tools): treat them as its plain defaults, so kdl's output does not depend on what else is installed
    for i, cb in enumerate(callbacks):
        if isinstance(cb, ModelSummary) and type(cb) in (ModelSummary, RichModelSummary):  # isinstance: for mypy
            callbacks[i] = QuietSummary(max_depth=cb._max_depth)
        elif type(cb) in (TQDMProgressBar, RichProgressBar) and plain:
            callbacks[i] = PlainProgress()


#: the start of Lightning's warning at a step-interval ModelCheckpoint's save in manual optimisation (filtered)
MANUAL_STEP_CHECKPOINT_WARNING = (
    "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state was saved"
)
#: Lightning's info lines that say nothing about the user's run (hardware it did not use, cloud tips)
_DROPPED_INFO = ("Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(s in msg for s in _DROPPED_INFO)


def quiet_lightning() -> None:
    """Silence advice that is noise for kdl users (cloud-logger tips, the tensorboardX notice)."""
    for msg in (
        ".*tensorboardX.*",
        ".*does not have many workers.*",
        "LightningCLI's args parameter is intended to run from within Python.*",  # kdl passes its argv on purpose
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's own use of torch's pytree
        # kdl's GAN methods optimise manually, and a ModelCheckpoint every N steps (the GAN snapshots a cGAN-KD
        # pipeline keeps) then warns at each save that it holds the model as it is AFTER that step's update. That
        # is what a snapshot is for (the GAN trained up to step N, which a later stage samples from and a resume
        # continues from), so the long warning in every GAN run's log says nothing; other manual-mode warnings stay.
        re.escape(MANUAL_STEP_CHECKPOINT_WARNING),
    ):
        warnings.filterwarnings("ignore", message=msg)
    logging.getLogger("lightning.pytorch").addFilter(_DropTips())
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(_DropTips())
