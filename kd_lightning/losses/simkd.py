"""SimKD (Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022).

The student's prediction head becomes a projector followed by the teacher's frozen classifier
(:class:`ReusedTeacherHead`). The head travels with the student: a checkpoint of a model that has
one holds its weights under ``student_head.*`` and a plain description under the checkpoint key
``"student_head"`` (:meth:`ReusedTeacherHead.spec`), so that ``ImageClassifier``, ``kdl test`` and
``FrozenTeacher.from_checkpoint`` rebuild it without the teacher's checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.losses.features import pool_to
from kd_lightning.nets.features import PREPOOL

#: checkpoint key holding the plain description of a student's replaced head
HEAD_KEY = "student_head"


class ReusedTeacherHead(nn.Module):
    """Student map -> (average-pooled to ``size``) projector -> global average pool -> teacher's classifier.

    The projector is SimKD's: 1x1 conv - BN - ReLU - 3x3 conv - BN - ReLU - 1x1 conv - BN - ReLU with
    ``teacher_channels // factor`` middle channels. The classifier is a copy of the teacher's linear
    head with gradients off.

    Args:
        student_channels: channels of the student map.
        teacher_channels: channels of the teacher map (the classifier's input).
        num_outputs: outputs of the teacher's classifier.
        factor: bottleneck factor of the projector.
        size: spatial size the student map is pooled to first (``None``: kept).
        feature: the student feature the head reads (a net feature name, default ``prepool``).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_outputs: int,
        factor: int = 2,
        size: tuple[int, int] | None = None,
        feature: str = PREPOOL,
    ) -> None:
        super().__init__()
        mid = max(1, teacher_channels // factor)
        self.student_channels, self.teacher_channels, self.num_outputs = student_channels, teacher_channels, num_outputs
        self.factor, self.feature = factor, feature
        self.size: tuple[int, int] | None = (size[0], size[1]) if size else None
        self.projector = nn.Sequential(
            nn.Conv2d(student_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 1, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(teacher_channels, num_outputs).requires_grad_(False)

    def project(self, s: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(s.shape[-2:]) != self.size:
            s = F.adaptive_avg_pool2d(s, self.size)
        return self.projector(s)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Logits from the student map."""
        return self.classifier(self.project(s).mean((2, 3)))

    def spec(self) -> dict[str, Any]:
        """Plain values that rebuild this head (saved in checkpoints next to its weights)."""
        return {
            "kind": "ReusedTeacherHead",
            "student_channels": self.student_channels,
            "teacher_channels": self.teacher_channels,
            "num_outputs": self.num_outputs,
            "factor": self.factor,
            "size": list(self.size) if self.size else None,
            "feature": self.feature,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ReusedTeacherHead:
        if not isinstance(spec, dict) or spec.get("kind") != "ReusedTeacherHead":
            raise CheckpointError(f"unknown student head description {spec!r}; expected a ReusedTeacherHead")
        return cls(
            int(spec["student_channels"]),
            int(spec["teacher_channels"]),
            int(spec["num_outputs"]),
            int(spec["factor"]),
            tuple(spec["size"]) if spec.get("size") else None,
            str(spec.get("feature", PREPOOL)),
        )


def head_from_checkpoint(ckpt: dict[str, Any], prefix: str = HEAD_KEY + ".") -> ReusedTeacherHead | None:
    """The replaced head of a checkpoint, with its weights loaded (``None`` when it has none)."""
    spec = ckpt.get(HEAD_KEY)
    if spec is None:
        return None
    head = ReusedTeacherHead.from_spec(spec)
    state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's student head does not fit its description {spec}: {e}") from None
    return head


class SimKD(KDLoss):
    """SimKD: the student's head is a projector + the teacher's frozen classifier; L2 on the final maps.

    The student's last map (``prepool``: the input of its global pooling) goes through a projector
    to the teacher's channels; the loss is the MSE with the teacher's last map (the larger map
    average-pooled to the other's size). The student then predicts with
    :class:`ReusedTeacherHead` (projector, pooling, the teacher's classifier): the model's
    outputs, task loss and metrics use it, and it is saved with the student. Paper/official
    defaults: weight 1 and no task loss (``task_weight: 0``), projector factor 2.

    Args:
        factor: bottleneck factor of the projector.
        student_feature: the student's map.
        teacher_feature: the teacher's map (its classifier must read its pooled channels).
        weight: factor in the total loss.
    """

    #: the student predicts through :attr:`head` instead of its own classifier
    replaces_head = True

    def __init__(
        self, factor: int = 2, student_feature: str = PREPOOL, teacher_feature: str = PREPOOL, weight: float = 1.0
    ) -> None:
        super().__init__(weight)
        if factor < 1:
            raise ConfigError(f"SimKD: factor={factor}; expected a positive integer")
        self.factor = factor
        self.student_features, self.teacher_features = (student_feature,), (teacher_feature,)

    def setup(self, info: SetupInfo) -> None:
        sc, sh, sw = require_shape(self, "student", info.student_shapes, self.student_features[0], 3)
        tc, th, tw = require_shape(self, "teacher", info.teacher_shapes, self.teacher_features[0], 3)
        net = info.teacher_net
        head_path = getattr(getattr(net, "net_info", None), "head", None)
        classifier = dict(net.named_modules()).get(head_path) if net is not None and head_path else None
        if not isinstance(classifier, nn.Linear):
            raise ConfigError("SimKD reuses the teacher's linear classifier, but no teacher net with one was given")
        if classifier.in_features != tc:
            raise ConfigError(
                f"SimKD: the teacher's classifier reads {classifier.in_features} features but its map "
                f"{self.teacher_features[0]!r} has shape {(tc, th, tw)}; pick the map its pooling reads"
            )
        size = (th, tw) if sh * sw > th * tw else None
        self.head = ReusedTeacherHead(sc, tc, classifier.out_features, self.factor, size, self.student_features[0])
        self.head.classifier.load_state_dict(classifier.state_dict())

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        s = self.head.project(student.features[self.student_features[0]])
        t = teacher.features[self.teacher_features[0]]
        if t.shape[-2:] != s.shape[-2:]:
            t = pool_to(t, s)
        return F.mse_loss(s.float(), t.float())
