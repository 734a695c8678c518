"""The W&B side of a kdl run: its name and group, the recipe and media it logs, its end; other loggers are left alone.

One place decides which loggers take media: :func:`wandb_loggers` (``isinstance`` of Lightning's
``WandbLogger``; wandb itself is imported by that logger only when it is used). ``kdl``'s Trainer commands
call :func:`name_wandb_loggers` on the parsed recipe, :func:`log_wandb_recipe` and :func:`prepare_wandb_run`
once the Trainer is built, and :func:`finish_wandb_run` when the command ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
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


def name_wandb_loggers(cfg: Any, method: Callable[[], str]) -> None:  # noqa: ANN401 - a jsonargparse Namespace
    """A W&B logger of the parsed config ``cfg`` without a name/group gets ``<method>-seed<N>`` and the recipe.

    So W&B groups the seeds of a recipe; in a ``kdl sweep`` trial the run is named by its swept values and grouped
    by its sweep. ``method`` gives the model's method name (asked only when there is a W&B logger).
    """
    loggers = cfg.get("trainer", {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
            continue
        name, seed = method(), cfg.get("seed_everything")
        recipes = [Path(str(p)) for p in cfg.get("config") or []]
        recipe = f"{recipes[0].parent.name}/{recipes[0].stem}" if recipes else name
        defaults = {"name": f"{name}-seed{seed}", "group": recipe, "tags": [name, f"seed{seed}", recipe]}
        trial = sweep_trial()  # a kdl sweep trial: named by its swept values, grouped by its sweep
        if trial is not None:
            defaults |= {"name": trial["trial"], "group": trial["group"], "tags": [name, recipe, trial["name"]]}
        for key, value in defaults.items():  # wandb.init's own arguments, which jsonargparse exposes
            if logger.init_args.get(key) is None:
                logger.init_args[key] = value
        # wandb's background service resolves a relative save_dir against the folder IT started in, not ours:
        # make it absolute; unset, the W&B files go into the run folder
        save_dir = logger.init_args.get("save_dir")
        if save_dir in (None, "", "."):
            save_dir = cfg.get("trainer", {}).get("default_root_dir") or "."
        logger.init_args["save_dir"] = os.path.abspath(str(save_dir))
        os.makedirs(logger.init_args["save_dir"], exist_ok=True)  # else W&B warns "git root ... does not exist"


def log_wandb_recipe(trainer: L.Trainer, recipe: Callable[[], dict[str, Any]]) -> None:
    """Log the whole resolved recipe (``recipe()``, plain values) to each W&B logger, not only the model's hparams."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            wandb_init: dict[str, Any] = getattr(logger, "_wandb_init", {})
            if "anonymous" in wandb_init and wandb_init["anonymous"] is None:  # W&B warns it has no effect
                del wandb_init["anonymous"]
            logger.log_hyperparams({"kdl": recipe()})


def finish_wandb_run(trainer: L.Trainer) -> None:
    """Close this command's W&B run, so the next command in the same process starts its own."""
    if wandb_loggers(trainer):
        import wandb

        if wandb.run is not None:
            wandb.run.finish()
