"""Training throughput in images per second, data loading included, validation excluded."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:
    import torch


class TrainThroughput(L.Callback):
    """Count training images and the wall time they took (loading + step), logged as ``train/img_per_s``.

    The time between the end of one training batch and the start of the next (data loading) counts;
    validation and checkpointing between epochs do not.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._start: float | None = None
        self._last_end: float | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None

    def on_train_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,  # noqa: ANN401 - Lightning's hook signature
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.seconds += now - self._last_end  # loading this batch
        self._start = now

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,  # noqa: ANN401 - Lightning's hook signature
        batch: Any,  # noqa: ANN401 - Lightning's hook signature
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._start is not None:
            self.seconds += now - self._start
            self.images += _batch_size(batch)
        self._last_end = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds > 0:
            pl_module.log("train/img_per_s", self.images_per_second, on_epoch=True)


def _batch_size(batch: torch.Tensor | dict[str, torch.Tensor] | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> int:
    if isinstance(batch, dict):
        batch = batch.get("image", next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0])
