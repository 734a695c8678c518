"""SSKD's first stage: train the teacher's SS module on the frozen teacher, before any student.

The authors' code (xuguodong03/SSKD, ``student.py``) trains the teacher's SS module for 60 epochs (SGD lr 0.05,
momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 30 and 45) on the teacher's frozen penultimate features,
then freezes it for the student's run. :class:`SSKDTeacherHead` is that stage as a LightningModule; the
:class:`~kd_lightning.losses.SSKD` loss loads its checkpoint with ``teacher_head: <path>``
(``recipes/cifar100/sskd_teacher_head.yaml``, then ``recipes/cifar100/sskd_resnet32x4_resnet8x4.yaml``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.losses.sskd import ProjectionHead, rotation_similarity, rotations
from kd_lightning.methods.base import BaseTask, StageSteps
from kd_lightning.teachers import FrozenTeacher


class SSKDTeacherHead(StageSteps, BaseTask):
    """Train SSKD's SS module on a frozen teacher: which normal image is each rotated view (90/180/270) from?

    Loss: cross-entropy over the cosine similarities between the SS-module embeddings of each rotated view and
    of every normal image of the batch (no temperature, as in the reference). Logs ``train/ss_loss``,
    ``train/ss_acc``, ``val/ss_loss``, ``val/ss_acc``; ``best.ckpt`` is the best ``val/ss_acc``.

    Args:
        teacher: ``kdl`` checkpoint of the teacher (a supervised classifier).
        head_batch_norm: Linear-BN-ReLU-Linear instead of the authors' Linear-ReLU-Linear (must match the
            SSKD loss's ``head_batch_norm``).
        **kwargs: see :class:`~kd_lightning.methods.base.BaseTask` (optimiser and LR schedule of the head).
    """

    monitor, monitor_mode = "val/ss_acc", "max"

    def __init__(self, teacher: str, head_batch_norm: bool = False, **kwargs: Any) -> None:
        self._pending = (FrozenTeacher.from_checkpoint(teacher),)  # a tuple: no Module before Module.__init__
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        from kd_lightning.methods.distill import DistillModule

        (self.teacher,) = self._pending
        del self._pending
        hp = self.hparams
        self.teacher.check_compatible(
            "classification", hp.num_classes, hp.in_channels, who="the data", image_size=hp.get("image_size")
        )
        dim = DistillModule._probe(self.teacher.net, self.teacher.normalize, hp)["penultimate"].numel()
        self.head = ProjectionHead(dim, hp.head_batch_norm)

    def trainable_parameters(self) -> Iterable[torch.Tensor]:
        return self.head.parameters()

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        x = batch["image"]
        n = len(x)
        _, feats = self.teacher.forward_features(torch.cat([x, rotations(x)]), ["penultimate"])
        emb = self.head(feats["penultimate"])
        sim = rotation_similarity(emb[n:], emb[:n])
        source = torch.arange(n, device=x.device).repeat_interleave(3)
        loss = F.cross_entropy(sim, source)
        acc = (sim.argmax(1) == source).float().mean()
        self.log_dict({f"{stage}/ss_loss": loss, f"{stage}/ss_acc": acc}, on_step=False, on_epoch=True)
        return loss


__all__ = ["SSKDTeacherHead"]
