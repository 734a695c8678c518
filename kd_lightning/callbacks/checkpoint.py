"""kdl's checkpoint callback, and the files that ``--ckpt_path last`` / ``best`` name in a run folder.

:class:`KDCheckpoint` keeps ``last.ckpt`` and the best checkpoint (``best.ckpt``) on the model's validation
metric under ``<default_root_dir>/checkpoints``; ``kdl fit`` adds it to every run (section ``checkpoint``).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class KDCheckpoint(ModelCheckpoint):
    """``last.ckpt`` plus the best checkpoint (``best.ckpt``) on the model's own metric.

    ``monitor``/``mode`` default to the model's ``monitor``/``monitor_mode`` attributes (e.g.
    ``val/acc1``/max for classifiers, ``val/mae``/min for regressors); ``dirpath`` defaults to
    ``<trainer.default_root_dir>/checkpoints``, a stable place that later stages can name.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best",
        monitor: str | None = None,
        mode: str | None = None,
        save_last: bool = True,
        save_top_k: int = 1,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode or "min",
            save_last=save_last,
            save_top_k=save_top_k,
            auto_insert_metric_name=False,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self._mode_given = mode is not None
        self._last_saved_at: int | None = None

    # Lightning >= 2.5 writes last.ckpt only when a top-k checkpoint is written; resuming needs the
    # latest state, so last.ckpt is (also) written at every validation / epoch-end save point. There is no
    # public hook for this: the private methods used here are pinned by tests/test_lightning_internals.py.
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        self._last_saved_at = trainer.global_step
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _would_save_last(self, trainer: L.Trainer, on_train_epoch_end: bool) -> bool:
        return (
            bool(self.save_last)
            and not self._should_skip_saving_checkpoint(trainer)
            and (self._should_save_on_train_epoch_end(trainer) == on_train_epoch_end)
        )

    def _ensure_last(self, trainer: L.Trainer, eligible: bool) -> None:
        if eligible and self._last_saved_at != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        eligible = self._would_save_last(trainer, on_train_epoch_end=False)
        super().on_validation_end(trainer, pl_module)
        self._ensure_last(trainer, eligible)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        eligible = self._would_save_last(trainer, on_train_epoch_end=True)
        super().on_train_epoch_end(trainer, pl_module)
        self._ensure_last(trainer, eligible)

    def bind(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        """Fill in defaults from the trainer and the model (called by kdl before the run)."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        monitor = getattr(model, "monitor", None)  # BaseTask's selection metric; other modules have none
        if self.monitor is None and monitor:
            self.monitor = monitor
            if not self._mode_given:
                mode = getattr(model, "monitor_mode", "min")
                self.mode, self.kth_value = mode, torch.tensor(torch.inf if mode == "min" else -torch.inf)


def resolve_ckpt_path(ckpt_path: str | os.PathLike | None, trainer: L.Trainer) -> str | None:
    """The file a ``fit`` would resume from: ``last`` is the newest ``last*.ckpt`` of the checkpoint folders."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path == "last":
        found = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                found += glob.glob(os.path.join(str(cb.dirpath), f"{cb.CHECKPOINT_NAME_LAST}*{cb.FILE_EXTENSION}"))
        return max(found, key=os.path.getmtime) if found else None
    return str(ckpt_path) if os.path.isfile(str(ckpt_path)) else None


def named_checkpoint(name: str, trainer: L.Trainer) -> str | None:
    """The file of ``--ckpt_path last`` or ``best`` in the checkpoint callbacks' folders, if it exists."""
    if name == "last":
        return resolve_ckpt_path("last", trainer)
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.best_model_path and os.path.isfile(cb.best_model_path):
            return cb.best_model_path
        if cb.dirpath and cb.filename and "{" not in cb.filename:
            path = os.path.join(str(cb.dirpath), cb.filename + cb.FILE_EXTENSION)
            if os.path.isfile(path):
                return path
    return None
