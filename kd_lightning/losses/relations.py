"""Losses on relations between samples of a batch: PKT, SP and RKD."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.nets.features import stage_names


class PKT(KDLoss):
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018).

    Cosine similarities between the L2-normalised features of a batch, mapped to [0, 1] and
    normalised per row into conditional probabilities ``p_ij``; the loss is the mean over all B x B
    entries of ``p^t_ij log((p^t_ij + eps) / (p^s_ij + eps))``, i.e. the row-wise KL(teacher || student)
    averaged over rows and divided by B, as RepDistiller computes it. The default weight 30000 (the CIFAR
    benchmarks') was tuned for that mean; a per-row sum would make the effective weight B times larger.

    Args:
        student_feature: student feature (default the penultimate vector).
        teacher_feature: teacher feature.
        eps: numerical floor.
        weight: factor in the total loss.
    """

    def __init__(
        self,
        student_feature: str = "penultimate",
        teacher_feature: str = "penultimate",
        eps: float = 1e-7,
        weight: float = 30000.0,
    ) -> None:
        super().__init__(weight)
        self.student_features, self.teacher_features, self.eps = (student_feature,), (teacher_feature,), eps

    def setup(self, info: SetupInfo) -> None:
        require_shape(self, "student", info.student_shapes, self.student_features[0], 1)
        require_shape(self, "teacher", info.teacher_shapes, self.teacher_features[0], 1)

    def _conditional(self, f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.float().flatten(1), dim=1, eps=self.eps)
        sim = (f @ f.t() + 1.0) / 2.0
        return sim / sim.sum(1, keepdim=True)

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        p_s = self._conditional(student.features[self.student_features[0]])
        p_t = self._conditional(teacher.features[self.teacher_features[0]])
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


class SP(KDLoss):
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

    ``G = F F^T`` for the flattened features of a batch, each row L2-normalised; the loss is
    ``||G_s - G_t||_F^2 / b^2``. Applied to the last stage; default weight 3000 (the CIFAR
    benchmarks'). Student and teacher maps may differ in shape: only the b x b matrices are compared.

    Args:
        student_feature: student feature (default the last declared stage).
        teacher_feature: teacher feature (default the last declared stage).
        weight: factor in the total loss.
    """

    def __init__(
        self, student_feature: str | None = None, teacher_feature: str | None = None, weight: float = 3000.0
    ) -> None:
        super().__init__(weight)
        self._given = (student_feature, teacher_feature)

    def setup(self, info: SetupInfo) -> None:
        s = self._given[0] or _last_stage(self, info.student_shapes, "student")
        t = self._given[1] or _last_stage(self, info.teacher_shapes, "teacher")
        if s not in info.student_shapes or t not in info.teacher_shapes:
            raise ConfigError(f"SP: features {s!r} (student) / {t!r} (teacher) are not declared by the nets")
        self.student_features, self.teacher_features = (s,), (t,)

    @staticmethod
    def similarity(f: torch.Tensor) -> torch.Tensor:
        f = f.float().flatten(1)
        return F.normalize(f @ f.t(), dim=1)

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        g_s = self.similarity(student.features[self.student_features[0]])
        g_t = self.similarity(teacher.features[self.teacher_features[0]])
        b = g_s.shape[0]
        return (g_s - g_t).pow(2).sum() / (b * b)


def _last_stage(loss: KDLoss, shapes: dict[str, torch.Size], side: str) -> str:
    stages = stage_names(shapes)
    if not stages:
        raise ConfigError(f"{type(loss).__name__}: the {side} net declares no stages; name a feature explicitly")
    return stages[-1]


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` (zero diagonal)."""
    sq = e.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


class RKD(KDLoss):
    """Park et al., "Relational Knowledge Distillation" (CVPR 2019).

    Distance-wise term: pairwise Euclidean distances, each divided by the mean of the non-zero
    distances, compared with the Huber (smooth L1) loss. Angle-wise term: for every triplet the
    cosine of the angle at the middle sample, compared with smooth L1. Paper weights
    ``w_dist = 25``, ``w_angle = 50`` on the penultimate features; default term weight 1. Uses no
    class outputs, so it also distils regression models (cGAN-KD Table 5).

    Args:
        student_feature: student feature (default the penultimate vector).
        teacher_feature: teacher feature.
        w_dist: weight of the distance-wise term.
        w_angle: weight of the angle-wise term.
        weight: factor in the total loss.
    """

    def __init__(
        self,
        student_feature: str = "penultimate",
        teacher_feature: str = "penultimate",
        w_dist: float = 25.0,
        w_angle: float = 50.0,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        self.student_features, self.teacher_features = (student_feature,), (teacher_feature,)
        self.w_dist, self.w_angle = w_dist, w_angle

    def setup(self, info: SetupInfo) -> None:
        for side, shapes, name in (
            ("student", info.student_shapes, self.student_features[0]),
            ("teacher", info.teacher_shapes, self.teacher_features[0]),
        ):
            if name not in shapes:
                raise ConfigError(f"RKD: the {side} has no feature {name!r} (has: {', '.join(shapes)})")

    @staticmethod
    def normalised_distances(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e)
        return d / d[d > 0].mean()

    @staticmethod
    def angles(e: torch.Tensor) -> torch.Tensor:
        """``cos`` of the angle at ``j`` between ``i`` and ``k``: (e_i - e_j) . (e_k - e_j), normalised."""
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i - e_j
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> dict[str, torch.Tensor]:
        s = student.features[self.student_features[0]].float().flatten(1)
        t = teacher.features[self.teacher_features[0]].float().flatten(1)
        dist = F.smooth_l1_loss(self.normalised_distances(s), self.normalised_distances(t))
        angle = F.smooth_l1_loss(self.angles(s), self.angles(t))
        return {"dist": self.w_dist * dist, "angle": self.w_angle * angle}
