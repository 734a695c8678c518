"""Plain supervised training: teachers, the NOKD student baseline, AI-KD's pre-trained copy."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.simkd import HEAD_KEY, ReusedTeacherHead
from kd_lightning.methods.base import BaseTask
from kd_lightning.metrics import classification_metrics, regression_metrics
from kd_lightning.nets import FeatureExtractor, create_net, net_info


class NetTask(BaseTask):
    """A task around one registered backbone ``self.net`` (see :func:`kd_lightning.nets.create_net`).

    A task may predict through a replaced head (``self.student_head``, e.g. SimKD's projector + the
    teacher's classifier) that reads a feature of the net: it is saved in the checkpoint with a plain
    description, and a checkpoint that has one gives it to the task that loads it.

    Args:
        net: registered net name (``kd_lightning.nets.list_nets()``).
        net_weights: optional path of a ``state_dict`` file for the net (never a download).
        channels_last: keep weights and inputs in channels-last memory format (faster convs).
        **kwargs: see :class:`~kd_lightning.methods.base.BaseTask`.
    """

    def __init__(
        self, net: str = "resnet20", net_weights: str | None = None, channels_last: bool = True, **kwargs: Any
    ) -> None:
        net_info(net)  # unknown name -> clear error before anything is built
        self.channels_last = channels_last
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        num_classes = hp.num_classes if self.task == "classification" else 1
        if num_classes is None:
            raise ConfigError(f"{type(self).__name__} needs num_classes (kdl links it from the DataModule)")
        self.net = create_net(hp.net, num_classes=num_classes, in_channels=hp.in_channels, task=self.task)  # type: ignore[arg-type]
        if hp.net_weights:
            from kd_lightning.checkpoints import load_state_dict_file

            self.net.load_state_dict(load_state_dict_file(hp.net_weights))
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.student_head: nn.Module | None = None

    def attach_head(self, head: nn.Module) -> None:
        """Predict through ``head``, which reads the net feature ``head.feature`` (SimKD: losses/simkd.py)."""
        self.student_head = head.to(self.device)
        self._head_features = FeatureExtractor(self.net, [head.feature])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> net outputs (logits, or normalised regression values)."""
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        if self.student_head is not None:
            return self.student_head(self._head_features.features[self.student_head.feature])
        return out

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

    def log_metrics(self, stage: str, metrics: nn.Module) -> None:
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test")  # type: ignore[arg-type]


class ImageClassifier(NetTask):
    """Cross-entropy classification.

    Args:
        label_smoothing: cross-entropy label smoothing (0 disables).
        **kwargs: see :class:`NetTask` and :class:`~kd_lightning.methods.base.BaseTask`.
    """

    task = "classification"
    monitor, monitor_mode = "val/acc1", "max"

    def __init__(self, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing}; expected a value in [0, 1)")
        super().__init__(**kwargs)

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.hparams.label_smoothing)

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes
        self.train_metrics = classification_metrics(n, full=False).clone(prefix="train/")
        self.val_metrics = classification_metrics(n).clone(prefix="val/")
        self.test_metrics = classification_metrics(n).clone(prefix="test/")

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["label"])
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), batch["label"])
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=stage == "train")
        self.log_metrics(stage, metrics)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch["image"])
        return {"index": batch["index"], "logits": logits, "label": batch["label"]}


class ImageRegressor(NetTask):
    """Scalar regression on labels normalised to [0, 1]; MAE and RMSE reported in original units.

    Args:
        loss: ``"mse"`` or ``"l1"`` on normalised labels.
        **kwargs: see :class:`NetTask` and :class:`~kd_lightning.methods.base.BaseTask`;
            ``label_range`` (linked from the DataModule) de-normalises the metrics.
    """

    task = "regression"
    monitor, monitor_mode = "val/mae", "min"

    def __init__(self, loss: Literal["mse", "l1"] = "mse", **kwargs: Any) -> None:
        if loss not in ("mse", "l1"):
            raise ConfigError(f"loss={loss!r}; expected 'mse' or 'l1'")
        super().__init__(**kwargs)

    def configure_losses(self) -> None:
        self.criterion = nn.MSELoss() if self.hparams.loss == "mse" else nn.L1Loss()

    def configure_metrics(self) -> None:
        self.train_metrics = regression_metrics().clone(prefix="train/")
        self.val_metrics = regression_metrics().clone(prefix="val/")
        self.test_metrics = regression_metrics().clone(prefix="test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        pred = self(batch["image"])
        label = batch["label"].float()
        loss = self.criterion(pred, label)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(self.denormalize(pred.detach()), self.denormalize(label))
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=stage == "train")
        self.log_metrics(stage, metrics)
        return loss

    training_step = ImageClassifier.training_step
    validation_step = ImageClassifier.validation_step
    test_step = ImageClassifier.test_step

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        pred = self(batch["image"])
        return {
            "index": batch["index"],
            "prediction": self.denormalize(pred),
            "label": self.denormalize(batch["label"].float()),
        }


__all__ = ["ImageClassifier", "ImageRegressor", "NetTask"]
