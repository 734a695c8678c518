"""FT's first stage: a paraphraser learns to reconstruct a frozen teacher's feature map.

``recipes/*/ft_paraphraser.yaml`` trains it; the FT loss of the student run then loads it from this
run's checkpoint (``FT(paraphraser=.../last.ckpt)``) and keeps it frozen (Kim et al. 2018, section 3.1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import require_shape
from kd_lightning.losses.factor import FT, Paraphraser
from kd_lightning.losses.features import _stage_names
from kd_lightning.methods.base import BaseTask, StageSteps
from kd_lightning.methods.distill import DistillModule
from kd_lightning.teachers import FrozenTeacher

#: checkpoint key naming the teacher feature the paraphraser was trained on
FEATURE_KEY = "paraphraser_feature"


class FTParaphraser(StageSteps, BaseTask):
    """Train FT's paraphraser (an autoencoder, :class:`~kd_lightning.losses.factor.Paraphraser`) on a teacher map.

    The loss is the mean squared reconstruction error of the teacher's map; the teacher is frozen.
    The checkpoint holds the paraphraser (``paraphraser.*``), its ``rate`` and the feature name.

    Args:
        teacher: path of the teacher's ``kdl`` checkpoint.
        feature: the teacher map to paraphrase (default its last declared stage, as FT's default).
        rate: paraphrase rate ``k``: the factor has ``k * C`` channels (paper and RepDistiller: 0.5).
        bn: BatchNorm after every convolution of the paraphraser (default off, as RepDistiller's).
        **kwargs: see :class:`~kd_lightning.methods.base.BaseTask`.
    """

    monitor, monitor_mode = "val/rec", "min"

    def __init__(
        self, teacher: str, feature: str | None = None, rate: float = 0.5, bn: bool = False, **kwargs: Any
    ) -> None:
        if rate <= 0:
            raise ConfigError(f"rate={rate}; expected a positive paraphrase rate")
        loaded = FrozenTeacher.from_checkpoint(teacher)
        self.task = loaded.task
        self._pending = (loaded,)  # a tuple: no Module attribute before nn.Module.__init__
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        (teacher,), hp = self._pending, self.hparams
        del self._pending
        teacher.check_compatible(
            self.task, hp.num_classes, hp.in_channels, who="the data", image_size=hp.get("image_size")
        )
        self.teacher = teacher
        shapes = DistillModule._probe(teacher.net, teacher.normalize, hp)
        stages = _stage_names(shapes)
        self.feature = hp.feature or (stages[-1] if stages else "prepool")
        channels = require_shape(FT(), "teacher", shapes, self.feature, 3)[0]
        self.paraphraser = Paraphraser(channels, hp.rate, bool(hp.get("bn", False)))

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        _, feats = self.teacher.forward_features(batch["image"], [self.feature])
        target = feats[self.feature]
        loss = F.mse_loss(self.paraphraser(target)[1], target)
        self.log(f"{stage}/rec", loss, on_step=stage == "train", on_epoch=True, prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[FEATURE_KEY] = self.feature


__all__ = ["FEATURE_KEY", "FTParaphraser"]
