"""Losses on intermediate feature maps: FitNet, AT and VID.

Student and teacher features are paired by the names the nets declare (``stage{i}``); a loss with
a connector builds it in :meth:`setup` from the probed shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.nets.features import stage_names


def _stage_names(info_shapes: dict[str, torch.Size]) -> list[str]:
    return stage_names(info_shapes)


def pair_stages(loss: KDLoss, info: SetupInfo, names: Sequence[str] | None) -> list[str]:
    """The stage names paired between student and teacher (all declared stages when ``names`` is None)."""
    if names:
        return list(names)
    s, t = _stage_names(info.student_shapes), _stage_names(info.teacher_shapes)
    if len(s) != len(t):
        raise ConfigError(
            f"{type(loss).__name__}: the student declares {len(s)} stages and the teacher {len(t)}; "
            "list the stages to pair explicitly (e.g. stages: [stage0, stage1])"
        )
    return s


def pool_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Average-pool the map ``x`` to the spatial size (last two dimensions) of ``like``."""
    return F.adaptive_avg_pool2d(x, (like.shape[-2], like.shape[-1]))


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the other's spatial size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-1] > b.shape[-1]:
        return pool_to(a, b), b
    return a, pool_to(b, a)


class FitNet(KDLoss):
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    A regressor maps the student's guided layer to the teacher's hint layer and the loss is their
    mean squared error. The regressor is a conv + BN + ReLU chosen from the spatial sizes
    (stride-2 conv when the student map is twice the teacher's, transposed conv for half, a valid
    conv otherwise), as in the CIFAR benchmarks; their default weight is 100 with the middle stage.

    Args:
        student_feature: the student's guided layer (``stage{i}`` or a module path).
        teacher_feature: the teacher's hint layer.
        weight: factor in the total loss.
    """

    def __init__(self, student_feature: str = "stage1", teacher_feature: str = "stage1", weight: float = 100.0) -> None:
        super().__init__(weight)
        self.student_features, self.teacher_features = (student_feature,), (teacher_feature,)

    def setup(self, info: SetupInfo) -> None:
        sc, sh, sw = require_shape(self, "student", info.student_shapes, self.student_features[0], 3)
        tc, th, tw = require_shape(self, "teacher", info.teacher_shapes, self.teacher_features[0], 3)
        if sh == 2 * th:
            conv: nn.Module = nn.Conv2d(sc, tc, 3, stride=2, padding=1)
        elif 2 * sh == th:
            conv = nn.ConvTranspose2d(sc, tc, 4, stride=2, padding=1)
        elif sh >= th and sw >= tw:
            conv = nn.Conv2d(sc, tc, (1 + sh - th, 1 + sw - tw))
        else:
            raise ConfigError(
                f"FitNet: student feature {self.student_features[0]!r} is {sh}x{sw} and teacher feature "
                f"{self.teacher_features[0]!r} is {th}x{tw}; the regressor maps a student map to a "
                "teacher map of equal, half or twice its size, or smaller: pick other stages"
            )
        self.regressor = nn.Sequential(conv, nn.BatchNorm2d(tc), nn.ReLU(inplace=True))

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        s = self.regressor(student.features[self.student_features[0]])
        return F.mse_loss(s, teacher.features[self.teacher_features[0]])


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's spatial attention: channel mean of ``|f|^p``, flattened and L2-normalised per sample."""
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)


class AT(KDLoss):
    """Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

    For each paired stage: the mean squared difference of the normalised attention maps
    (:func:`attention_map`, ``p = 2``), summed over stages. Maps of different sizes are
    average-pooled to the smaller one. Default weight 1000 (the CIFAR benchmarks' beta).

    Args:
        stages: stage names paired between student and teacher; ``None`` pairs every declared stage.
        p: exponent of the attention map.
        weight: factor in the total loss.
    """

    def __init__(self, stages: list[str] | None = None, p: float = 2.0, weight: float = 1000.0) -> None:
        super().__init__(weight)
        self.stages, self.p = stages, p

    def setup(self, info: SetupInfo) -> None:
        names = pair_stages(self, info, self.stages)
        for n in names:
            require_shape(self, "student", info.student_shapes, n, 3)
            require_shape(self, "teacher", info.teacher_shapes, n, 3)
        self.student_features = self.teacher_features = tuple(names)

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        for n in self.student_features:
            s, t = match_spatial(student.features[n], teacher.features[n])
            total = total + (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()
        return total


class VID(KDLoss):
    """Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019).

    For each paired stage a regressor (three 1x1 convs with ReLUs) predicts the mean of a
    Gaussian over the teacher's feature with a learned per-channel variance
    ``softplus(alpha) + eps``; the loss is the Gaussian negative log-likelihood (without the
    constant) ``0.5 (log var + (t - mu)^2 / var)``, averaged, and summed over stages. The variance
    starts at 5 (``init_var``), the paper's setting; default weight 1.

    Args:
        stages: stage names paired between student and teacher; ``None`` pairs every declared stage.
        init_var: initial predicted variance.
        eps: variance floor.
        weight: factor in the total loss.
    """

    def __init__(
        self, stages: list[str] | None = None, init_var: float = 5.0, eps: float = 1e-5, weight: float = 1.0
    ) -> None:
        super().__init__(weight)
        if init_var <= eps:
            raise ConfigError(f"VID: init_var={init_var}; expected a value > eps={eps}")
        self.stages, self.init_var, self.eps = stages, init_var, eps

    def setup(self, info: SetupInfo) -> None:
        names = pair_stages(self, info, self.stages)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        for n in names:
            sc = require_shape(self, "student", info.student_shapes, n, 3)[0]
            tc = require_shape(self, "teacher", info.teacher_shapes, n, 3)[0]
            self.regressors.append(
                nn.Sequential(
                    nn.Conv2d(sc, tc, 1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(tc, tc, 1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(tc, tc, 1, bias=False),
                )
            )
            # softplus^-1(init_var - eps): the variance starts at init_var
            start = math.log(math.expm1(self.init_var - self.eps))
            self.log_scales.append(nn.Parameter(torch.full((tc,), start)))
        self.student_features = self.teacher_features = tuple(names)

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        for n, reg, log_scale in zip(self.student_features, self.regressors, self.log_scales):
            s, t = match_spatial(student.features[n], teacher.features[n])
            mu = reg(s)
            var = (F.softplus(log_scale) + self.eps).view(1, -1, 1, 1)
            total = total + (0.5 * (var.log() + (mu - t).pow(2) / var)).mean()
        return total
