"""Images and tables for the W&B loggers of a trainer; every other logger is left alone.

One place decides which loggers take media: :func:`wandb_loggers` (``isinstance`` of Lightning's
``WandbLogger``; wandb itself is imported by that logger only when it is used).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

#: environment variables through which a trial's ``kdl`` learns it runs in a ``kdl sweep`` (set by kd_lightning.sweep)
SWEEP_ENV = "KDL_SWEEP"  # JSON: {"id", "name", "group", "trial", "values"}
RECORD_ENV = "KDL_SWEEP_RECORD"  # a file where each trial's kdl fit appends its run folder


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (an empty list without any)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_image(trainer: L.Trainer, key: str, path: str | os.PathLike, step: int | None = None) -> None:
    """Log the image file ``path`` under ``key`` to every W&B logger (at ``step`` when given)."""
    extra: dict[str, Any] = {} if step is None else {"step": step}
    for logger in wandb_loggers(trainer):
        logger.log_image(key=key, images=[str(path)], **extra)


def log_table(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table under ``key`` to every W&B logger."""
    for logger in wandb_loggers(trainer):
        logger.log_table(key=key, columns=columns, data=rows)


def sweep_trial() -> dict[str, Any] | None:
    """The ``kdl sweep`` trial this process runs (id, name, group, trial, values), or None outside a sweep."""
    import json

    text = os.environ.get(SWEEP_ENV)
    if not text:
        return None
    try:
        trial = json.loads(text)
    except ValueError:
        return None
    return trial if isinstance(trial, dict) else None


def prepare_wandb_run(trainer: L.Trainer, model: L.LightningModule, subcommand: str | None) -> None:
    """What every run that logs to W&B gets, before it starts.

    - a CSV logger beside W&B (``<default_root_dir>/lightning_logs/version_N/metrics.csv``), so ``kdl report``
      reads the run like any other, offline, without the W&B files;
    - W&B's summary of the model's monitor is its best value (``define_metric(summary="max"|"min")``), the epoch
      ``best.ckpt`` holds, so a sweep optimises that rather than the last epoch;
    - in a ``kdl sweep`` trial: the swept keys flat in the run's config (as ``wandb agent`` puts them) with the sweep
      (id, name, trial), and the run folder recorded for the sweep's results table.
    """
    from lightning.pytorch.loggers import CSVLogger

    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    if not any(isinstance(lg, CSVLogger) for lg in trainer.loggers):
        trainer.loggers = [*trainer.loggers, CSVLogger(save_dir=trainer.default_root_dir)]
    monitor, mode = getattr(model, "monitor", None), getattr(model, "monitor_mode", "min")
    trial = sweep_trial()
    for logger in loggers:
        if monitor and subcommand == "fit":
            logger.experiment.define_metric(monitor, summary="max" if mode == "max" else "min")
        if trial is not None:
            values = trial.get("values") or {}
            logger.log_hyperparams({**values, "sweep": {k: trial.get(k) for k in ("id", "name", "trial")}})
    record = os.environ.get(RECORD_ENV)
    if record and subcommand == "fit":
        with open(record, "a") as f:
            f.write(os.path.abspath(trainer.default_root_dir) + "\n")
