"""What the black-box baselines share: answer-type checks, a second optimiser beside the student's, the pool."""

from __future__ import annotations

from typing import Any

import torch

from kd_lightning.errors import ConfigError
from kd_lightning.methods.blackbox_student import BlackBoxStudent
from kd_lightning.teachers.client import QueryClient


def need_responses(responses: str, want: str, method: str) -> None:
    """Refuse a baseline the wrong answer type, naming the one it needs."""
    if responses != want:
        why = "probabilities" if want == "soft" else "only the teacher's decisions (class ids)"
        raise ConfigError(f"{method} needs {want} answers ({why}); got responses={responses!r}: set responses: {want}")


def with_second_optimizer(student: Any, other: torch.optim.Optimizer) -> Any:  # noqa: ANN401 - Lightning's union
    """The student's optimiser (and scheduler) from :meth:`BaseTask.configure_optimizers`, plus a second optimiser."""
    if isinstance(student, dict):
        return [student["optimizer"], other], [student["lr_scheduler"]["scheduler"]]
    return [student, other]


class PoolBaseline(BlackBoxStudent):
    """Shared: the client of a connected run, the pool dataset, and ``queries/spent`` at every validation."""

    @property
    def client(self) -> QueryClient:
        if self.link.client is None:
            raise RuntimeError(f"{type(self).__name__}: the teacher is not connected (on_fit_start has not run)")
        return self.link.client

    def pool_dataset(self) -> Any:  # noqa: ANN401 - a map-style dataset with a length
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_dataset", None)
        if ds is None:
            raise ConfigError(f"{type(self).__name__} reads its local images from a QueryPoolDataModule (pool: local)")
        return ds

    def pool_images(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        ds = self.pool_dataset()
        return torch.stack([ds[int(i)]["image"] for i in index]).to(self.device)

    def on_validation_epoch_end(self) -> None:
        if self.link.client is not None:
            self.log("queries/spent", float(self.link.client.spent))


__all__ = ["PoolBaseline", "need_responses", "with_second_optimizer"]
