"""What differs between classification and regression, in one place.

A :class:`TaskSpec` holds everything a LightningModule would otherwise branch on: the net's output size, the
task loss, the metric collections, how a net output becomes a prediction, what the metrics are fed (regression
metrics in original units) and what ``predict_step`` returns, plus the metric a checkpoint callback tracks.
:class:`~kd_lightning.methods.supervised.NetTask` and everything built on it (``ImageClassifier``,
``ImageRegressor``, ``DistillModule``, the self-distillation methods) ask their spec instead of testing
``self.task``. A new kind of task is one more subclass here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import nn
from torchmetrics import MetricCollection

from kd_lightning.errors import ConfigError
from kd_lightning.metrics import classification_metrics, regression_metrics

Denormalize = Callable[[torch.Tensor], torch.Tensor]


class TaskSpec:
    """The behaviour of one kind of task (see the module doc)."""

    name: ClassVar[str]
    #: predicts classes (class-output KD losses apply)
    has_classes: ClassVar[bool]
    #: metric the default checkpoint callback tracks, and in which direction
    monitor: ClassVar[str]
    monitor_mode: ClassVar[str]

    def out_features(self, num_classes: int | None) -> int:
        """Outputs of the net's head."""
        raise NotImplementedError

    def criterion(self) -> nn.Module:
        """The task loss (on predictions and labels as the data gives them)."""
        raise NotImplementedError

    def metrics(self, num_classes: int | None) -> tuple[MetricCollection, MetricCollection, MetricCollection]:
        """Train, validation and test metric collections, prefixed ``train/``, ``val/``, ``test/``."""
        raise NotImplementedError

    def prediction(self, raw: torch.Tensor) -> torch.Tensor:
        """A net's raw output -> the prediction the loss and the metrics see."""
        return raw

    def loss(self, criterion: nn.Module, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The task loss of ``pred`` against ``label``."""
        return criterion(pred, label)

    def update_metrics(
        self, metrics: MetricCollection, pred: torch.Tensor, label: torch.Tensor, denormalize: Denormalize
    ) -> None:
        """Feed one batch to ``metrics``."""
        metrics.update(pred.detach(), label)

    def predict_output(
        self, index: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, denormalize: Denormalize
    ) -> dict[str, torch.Tensor]:
        """What ``predict_step`` returns for one batch."""
        raise NotImplementedError


class Classification(TaskSpec):
    """Cross-entropy on class ids; top-1/top-5, macro-F1 and calibration metrics.

    Args:
        label_smoothing: cross-entropy label smoothing (0 disables).
    """

    name = "classification"
    has_classes = True
    monitor, monitor_mode = "val/acc1", "max"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing}; expected a value in [0, 1)")
        self.label_smoothing = label_smoothing

    def out_features(self, num_classes: int | None) -> int:
        if num_classes is None:
            raise ConfigError("a classification model needs num_classes (kdl links it from the DataModule)")
        return num_classes

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)

    def metrics(self, num_classes: int | None) -> tuple[MetricCollection, MetricCollection, MetricCollection]:
        n = self.out_features(num_classes)
        return (
            classification_metrics(n, full=False).clone(prefix="train/"),
            classification_metrics(n).clone(prefix="val/"),
            classification_metrics(n).clone(prefix="test/"),
        )

    def predict_output(
        self, index: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, denormalize: Denormalize
    ) -> dict[str, torch.Tensor]:
        return {"index": index, "logits": pred, "label": label}


class Regression(TaskSpec):
    """One scalar per image on labels normalised to [0, 1]; MAE and RMSE reported in original units.

    Args:
        loss: ``"mse"`` or ``"l1"`` on the normalised labels.
    """

    name = "regression"
    has_classes = False
    monitor, monitor_mode = "val/mae", "min"

    def __init__(self, loss: Literal["mse", "l1"] = "mse") -> None:
        if loss not in ("mse", "l1"):
            raise ConfigError(f"loss={loss!r}; expected 'mse' or 'l1'")
        self.loss_name = loss

    def out_features(self, num_classes: int | None) -> int:
        return 1

    def criterion(self) -> nn.Module:
        return nn.MSELoss() if self.loss_name == "mse" else nn.L1Loss()

    def metrics(self, num_classes: int | None) -> tuple[MetricCollection, MetricCollection, MetricCollection]:
        base = regression_metrics()
        return base.clone(prefix="train/"), base.clone(prefix="val/"), base.clone(prefix="test/")

    def prediction(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.squeeze(-1) if raw.ndim > 1 else raw

    def loss(self, criterion: nn.Module, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return criterion(pred, label.float())

    def update_metrics(
        self, metrics: MetricCollection, pred: torch.Tensor, label: torch.Tensor, denormalize: Denormalize
    ) -> None:
        metrics.update(denormalize(pred.detach()), denormalize(label.float()))

    def predict_output(
        self, index: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, denormalize: Denormalize
    ) -> dict[str, torch.Tensor]:
        return {"index": index, "prediction": denormalize(pred), "label": denormalize(label.float())}


TASKS: dict[str, type[TaskSpec]] = {"classification": Classification, "regression": Regression}


def task_spec(name: str, label_smoothing: float = 0.0, regression_loss: Literal["mse", "l1"] = "mse") -> TaskSpec:
    """The spec of task ``name`` with the options that apply to it."""
    if name == "classification":
        return Classification(label_smoothing)
    if name == "regression":
        return Regression(regression_loss)
    raise ConfigError(f"task={name!r}; expected one of: {', '.join(TASKS)}")


__all__ = ["TASKS", "Classification", "Regression", "TaskSpec", "task_spec"]
