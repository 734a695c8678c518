"""Plain supervised training: teachers, the NOKD student baseline, AI-KD's pre-trained copy."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torchmetrics import MetricCollection

from kd_lightning.losses.simkd import HEAD_KEY, ReusedTeacherHead
from kd_lightning.methods.base import BaseTask, StageSteps
from kd_lightning.methods.tasks import Classification, Regression, TaskSpec, task_spec
from kd_lightning.nets import FeatureExtractor, create_net, net_info
from kd_lightning.nets.registry import Task


class NetTask(StageSteps, BaseTask):
    """A task around one registered backbone ``self.net`` (see :func:`kd_lightning.nets.create_net`).

    What depends on the kind of task (classification or regression: the head size, the loss, the metrics,
    the prediction, the monitored metric) comes from ``self.spec``, a :class:`~kd_lightning.methods.tasks.TaskSpec`
    that :meth:`make_task_spec` builds; the steps here are the same for every task.

    A task may predict through a replaced head (``self.student_head``, e.g. SimKD's projector + the
    teacher's classifier) that reads a feature of the net: it is saved in the checkpoint with a plain
    description, and a checkpoint that has one gives it to the task that loads it.

    Args:
        net: registered net name (``kd_lightning.nets.list_nets()``).
        net_weights: optional path of a ``state_dict`` file for the net (never a download).
        channels_last: keep weights and inputs in channels-last memory format (faster convs).
        **kwargs: see :class:`~kd_lightning.methods.base.BaseTask`.
    """

    task: Task = "classification"

    def __init__(
        self, net: str = "resnet20", net_weights: str | None = None, channels_last: bool = True, **kwargs: Any
    ) -> None:
        net_info(net)  # unknown name -> clear error before anything is built
        self.channels_last = channels_last
        super().__init__(**kwargs)

    def make_task_spec(self) -> TaskSpec:
        """The spec of ``self.task`` (subclasses pass their loss options)."""
        return task_spec(self.task)

    def configure_models(self) -> None:
        hp = self.hparams
        self.spec = self.make_task_spec()
        self.monitor, self.monitor_mode = self.spec.monitor, self.spec.monitor_mode
        num_classes = self.spec.out_features(hp.num_classes)
        self.net = create_net(hp.net, num_classes=num_classes, in_channels=hp.in_channels, task=self.task)
        if hp.net_weights:
            from kd_lightning.checkpoints import load_state_dict_file

            self.net.load_state_dict(load_state_dict_file(hp.net_weights))
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.student_head: ReusedTeacherHead | None = None

    def configure_losses(self) -> None:
        self.criterion = self.spec.criterion()

    def configure_metrics(self) -> None:
        self.train_metrics, self.val_metrics, self.test_metrics = self.spec.metrics(self.hparams.num_classes)

    def attach_head(self, head: ReusedTeacherHead) -> None:
        """Predict through ``head``, which reads the net feature ``head.feature`` (SimKD: losses/simkd.py)."""
        self.student_head = head.to(self.device)
        self._head_features = FeatureExtractor(self.net, [head.feature])

    def raw_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the net's outputs (logits, or N x 1 normalised regression values)."""
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        if self.student_head is not None:
            return self.student_head(self._head_features.features[self.student_head.feature])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> predictions (logits, or N normalised regression values)."""
        return self.spec.prediction(self.raw_forward(x))

    # ------------------------------------------------------------------ steps
    def update_metrics(self, stage: str, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Feed the ``stage`` metrics one batch and log them."""
        metrics = getattr(self, f"{stage}_metrics")
        self.spec.update_metrics(metrics, pred, label, self.denormalize)
        self.log_metrics(stage, metrics)

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        pred = self(batch["image"])
        loss = self.spec.loss(self.criterion, pred, batch["label"])
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=stage == "train")
        self.update_metrics(stage, pred, batch["label"])
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.spec.predict_output(batch["index"], self(batch["image"]), batch["label"], self.denormalize)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.student_head is not None:
            checkpoint[HEAD_KEY] = self.student_head.spec()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = checkpoint.get(HEAD_KEY)
        if spec is not None:
            if self.student_head is None:
                self.attach_head(ReusedTeacherHead.from_spec(spec))
            # a distilled student read by a plain task: the teacher and the KD connectors stay behind
            ours, state = self.state_dict(), checkpoint.get("state_dict", {})
            for k in [k for k in state if k not in ours and k.startswith(("teacher.", "kd_terms."))]:
                del state[k]
        super().on_load_checkpoint(checkpoint)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Map normalised regression labels/predictions back to original units (``label_range``)."""
        if self.hparams.label_range is None:
            return y
        lo, hi = self.hparams.label_range
        return y * (hi - lo) + lo

    def log_metrics(self, stage: str, metrics: MetricCollection) -> None:
        """Log ``metrics`` (epoch values: Lightning computes and resets them at the end of each epoch).

        Only the first update after a reset logs them: the epoch value comes from the metrics' own state, while
        every ``self.log`` of a metric costs Lightning ~1-3 ms of bookkeeping on a CPU (docs/performance.md).
        """
        first = next(iter(metrics.values()), None)
        if first is None or first.update_count <= 1:
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test")


class ImageClassifier(NetTask):
    """Cross-entropy classification.

    Args:
        label_smoothing: cross-entropy label smoothing (0 disables).
        **kwargs: see :class:`NetTask` and :class:`~kd_lightning.methods.base.BaseTask`.
    """

    task = "classification"
    monitor, monitor_mode = Classification.monitor, Classification.monitor_mode

    def __init__(self, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        Classification(label_smoothing)  # a bad value fails here, before anything is built
        super().__init__(**kwargs)

    def make_task_spec(self) -> TaskSpec:
        return Classification(self.hparams.label_smoothing)


class ImageRegressor(NetTask):
    """Scalar regression on labels normalised to [0, 1]; MAE and RMSE reported in original units.

    Args:
        loss: ``"mse"`` or ``"l1"`` on normalised labels.
        **kwargs: see :class:`NetTask` and :class:`~kd_lightning.methods.base.BaseTask`;
            ``label_range`` (linked from the DataModule) de-normalises the metrics.
    """

    task = "regression"
    monitor, monitor_mode = Regression.monitor, Regression.monitor_mode

    def __init__(self, loss: Literal["mse", "l1"] = "mse", **kwargs: Any) -> None:
        Regression(loss)  # a bad value fails here, before anything is built
        super().__init__(**kwargs)

    def make_task_spec(self) -> TaskSpec:
        return Regression(self.hparams.loss)


__all__ = ["ImageClassifier", "ImageRegressor", "NetTask"]
