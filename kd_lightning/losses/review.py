"""ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021): ABF fusion + HCL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.losses.features import _stage_names


class ABF(nn.Module):
    """Attention-based fusion: a student stage (1x1 conv to ``mid``) fused with the deeper level's output.

    The two maps are weighted per position by two sigmoid attention maps computed from their
    concatenation; a 3x3 conv maps the fusion to the teacher's channels. Returns ``(output, fused)``;
    ``fused`` is passed on to the next, shallower stage.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.conv1 = nn.Sequential(conv1, nn.BatchNorm2d(mid_channels))
        conv2 = nn.Conv2d(mid_channels, out_channels, 3, 1, 1, bias=False)
        self.conv2 = nn.Sequential(conv2, nn.BatchNorm2d(out_channels))
        self.att = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(conv1.weight, a=1)
        nn.init.kaiming_uniform_(conv2.weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att is not None and deeper is not None:
            y = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            z = self.att(torch.cat([x, y], 1))
            x = x * z[:, :1] + y * z[:, 1:]
        return self.conv2(x), x


def hcl(student: torch.Tensor, teacher: torch.Tensor, levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss: MSE at full size and after average pooling to each ``l x l``, weighted 1, 1/2, 1/4...

    normalised by the sum of the weights.
    """
    loss, total, w = F.mse_loss(student, teacher), 1.0, 1.0
    for lv in levels:
        if lv >= student.shape[-1]:
            continue
        w /= 2.0
        loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(student, lv), F.adaptive_avg_pool2d(teacher, lv))
        total += w
    return loss / total


class ReviewKD(KDLoss):
    """Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021).

    Every student stage is fused, from the deepest to the shallowest, with the fused output of the
    stage below it (ABF); each fused map is compared with the teacher's map of the same stage by the
    hierarchical context loss (HCL), and the stages are summed. Teacher and student must declare
    the same number of stages with the same spatial sizes: other pairs are refused when the student
    is built (the paper's NA). Default weight 1 (the official CIFAR-100 scripts use 5 for
    resnet32x4 -> resnet8x4 and wrn_40_2 -> wrn_40_1, 1 for resnet110 -> resnet32); the fusion has
    ``min(512, C)`` channels, ``C`` those of the student's deepest stage (official code). The official
    code ramps the term in over 20 epochs (``min(1, epoch / 20)``): ``warmup_epochs: 20``.

    Args:
        mid_channels: channels of the fusion (``None``: ``min(512, C)`` as above).
        levels: pooled sizes of HCL's pyramid (besides the full map).
        warmup_epochs: epochs over which the term ramps from 0 to full weight (0: none).
        weight: factor in the total loss.
    """

    def __init__(
        self,
        mid_channels: int | None = None,
        levels: list[int] | None = None,
        warmup_epochs: int = 0,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if mid_channels is not None and mid_channels < 1:
            raise ConfigError(f"ReviewKD: mid_channels={mid_channels}; expected a positive integer")
        if warmup_epochs < 0:
            raise ConfigError(f"ReviewKD: warmup_epochs={warmup_epochs}; expected a value >= 0")
        self.mid_channels, self.levels = mid_channels, tuple(levels) if levels is not None else (4, 2, 1)
        self.warmup_epochs = warmup_epochs

    def setup(self, info: SetupInfo) -> None:
        s_names, t_names = _stage_names(info.student_shapes), _stage_names(info.teacher_shapes)
        s_shapes = [tuple(require_shape(self, "student", info.student_shapes, n, 3)) for n in s_names]
        t_shapes = [tuple(require_shape(self, "teacher", info.teacher_shapes, n, 3)) for n in t_names]
        if len(s_names) != len(t_names) or any(a[1:] != b[1:] for a, b in zip(s_shapes, t_shapes)):
            raise ConfigError(
                "ReviewKD needs teacher and student stages of the same number and spatial sizes; the student's "
                f"stages are {s_shapes} and the teacher's {t_shapes} (C, H, W)"
            )
        n = len(s_names)
        mid = self.mid_channels or min(512, s_shapes[-1][0])
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < n - 1) for i, (s, t) in enumerate(zip(s_shapes, t_shapes))
        )
        self.student_features, self.teacher_features = tuple(s_names), tuple(t_names)

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        deeper = None
        for i in reversed(range(len(self.abfs))):
            out, deeper = self.abfs[i](student.features[self.student_features[i]], deeper)
            total = total + hcl(out.float(), teacher.features[self.teacher_features[i]].float(), self.levels)
        if ctx is not None and self.warmup_epochs > 0:
            total = total * min(1.0, ctx.epoch / self.warmup_epochs)
        return total
