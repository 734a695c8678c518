"""SSKD: knowledge distillation with rotation self-supervision."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.losses.functional import kd_kl


def rotations(x: torch.Tensor) -> torch.Tensor:
    """``3N`` images: the 90, 180 and 270 degree rotations of image 0, then of image 1, ..."""
    views = [torch.rot90(x, k, (2, 3)) for k in (1, 2, 3)]
    return torch.stack(views, 1).flatten(0, 1)


def rotation_similarity(rotated: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each rotated view's embedding (3N rows) with every normal one (N columns)."""
    return F.cosine_similarity(rotated.unsqueeze(1), normal.unsqueeze(0), dim=2)


def keep_by_rank(scores: torch.Tensor, target: torch.Tensor, ratio: float) -> torch.Tensor:
    """SSKD's error-level filter: the sorted indices of the rows to keep.

    The rows where ``target`` ranks first, plus the ``ratio`` of the others whose target ranks best.
    """
    rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(1)  # 0 when the target is the top score
    order = torch.argsort(rank, stable=True)
    wrong = int((rank > 0).sum())
    keep = len(rank) - wrong + int(wrong * ratio)
    return order[:keep].sort().values


class ProjectionHead(nn.Module):
    """SSKD's SS module on the penultimate feature: Linear - ReLU - Linear, as the authors' code builds it.

    ``batch_norm=True`` adds a BatchNorm1d after the first Linear.
    """

    def __init__(self, dim: int, batch_norm: bool = False) -> None:
        super().__init__()
        norm: nn.Module = nn.BatchNorm1d(dim) if batch_norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), norm, nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(1).float())


class SSKD(KDLoss):
    """Xu et al., "Knowledge Distillation Meets Self-Supervision" (ECCV 2020).

    Every image is also seen rotated by 90/180/270 degrees. Terms (paper defaults in brackets):
    ``kd``: BLKD on the normal images (T = 4, weight 0.9); ``tf``: BLKD on the rotated images,
    keeping the samples the teacher ranks the true class first plus ``tf_ratio`` of the others
    (T = 4, weight 2.7, ratio 1.0); ``ss``: KL between the student's and the teacher's
    rotated-vs-normal similarity matrices of their SS-module embeddings, keeping rows ranked
    correctly by the teacher plus ``ss_ratio`` of the rest (T = 0.5, weight 10, ratio 0.75).
    Use it with the task loss weighted 0.1 (``task_weight: 0.1``): the authors' default ``--ce-weight``,
    also cGAN-KD's copy.

    The teacher's SS module is trained first, on the frozen teacher backbone, to pick out each rotated
    view's source image among the normal ones (cross-entropy on the similarities). Two schedules:

    - the reference's (``teacher_head``): a separate stage, :class:`~kd_lightning.methods.SSKDTeacherHead`
      (60 epochs, SGD lr 0.05 decayed x0.1 at 30 and 45 in ``recipes/cifar100/sskd_teacher_head.yaml``), whose
      checkpoint is loaded here and kept frozen; the student's ``ss`` term is on from the first step.
    - in-run (no ``teacher_head``): during the first ``teacher_epochs`` epochs only the teacher's SS module
      learns from the ``ss`` data (the student still learns from the other terms); afterwards it keeps
      training with the student's optimiser, and the student's ``ss`` term is switched on. Its loss is
      reported as ``ss_teacher`` (it touches no student weight).

    Args:
        kd_T, tf_T, ss_T: temperatures of the three terms.
        kd_weight, tf_weight, ss_weight: their weights.
        tf_ratio, ss_ratio: share of wrongly ranked samples kept.
        teacher_epochs: in-run schedule: epochs that train only the teacher's SS module before ``ss`` is on.
        teacher_head: ``kdl`` checkpoint of :class:`~kd_lightning.methods.SSKDTeacherHead` (the reference
            schedule): the teacher's SS module is loaded from it and frozen.
        head_batch_norm: a BatchNorm1d in both SS modules (Linear-BN-ReLU-Linear); the authors' is without.
        weight: factor of the sum in the total loss.
    """

    uses_logits = True
    student_features = ("penultimate",)
    teacher_features = ("penultimate",)

    def __init__(
        self,
        kd_T: float = 4.0,
        tf_T: float = 4.0,
        ss_T: float = 0.5,
        kd_weight: float = 0.9,
        tf_weight: float = 2.7,
        ss_weight: float = 10.0,
        tf_ratio: float = 1.0,
        ss_ratio: float = 0.75,
        teacher_epochs: int = 1,
        teacher_head: str | None = None,
        head_batch_norm: bool = False,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if min(kd_T, tf_T, ss_T) <= 0 or not (0 <= tf_ratio <= 1 and 0 <= ss_ratio <= 1):
            raise ConfigError(
                f"SSKD: temperatures must be positive and ratios in [0, 1] (kd_T={kd_T}, tf_T={tf_T}, "
                f"ss_T={ss_T}, tf_ratio={tf_ratio}, ss_ratio={ss_ratio})"
            )
        self.kd_T, self.tf_T, self.ss_T = kd_T, tf_T, ss_T
        self.kd_weight, self.tf_weight, self.ss_weight = kd_weight, tf_weight, ss_weight
        self.tf_ratio, self.ss_ratio, self.teacher_epochs = tf_ratio, ss_ratio, teacher_epochs
        self.teacher_head_path, self.head_batch_norm = teacher_head, head_batch_norm

    @property
    def frozen_teacher_head(self) -> bool:
        return self.teacher_head_path is not None

    def setup(self, info: SetupInfo) -> None:
        s_dim = math.prod(require_shape(self, "student", info.student_shapes, "penultimate", 1))
        t_dim = math.prod(require_shape(self, "teacher", info.teacher_shapes, "penultimate", 1))
        self.student_head = ProjectionHead(s_dim, self.head_batch_norm)
        self.teacher_head = ProjectionHead(t_dim, self.head_batch_norm)
        if self.teacher_head_path is not None:
            load_teacher_head(self.teacher_head, self.teacher_head_path)
            self.teacher_head.requires_grad_(False)

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> dict[str, torch.Tensor]:
        if ctx is None:
            raise ConfigError("SSKD needs the step context (extra forward passes on rotated images)")
        x, y = batch["image"], batch["label"]
        n = len(x)
        rot = rotations(x)
        s_rot, t_rot = ctx.student(rot), ctx.teacher(rot)
        # kd: normal images (outputs from the main forward pass)
        kd = kd_kl(student.logits, teacher.logits, self.kd_T)
        # tf: rotated images, filtered by the teacher's rank of the true class
        y_rot = y.repeat_interleave(3)
        keep_tf = keep_by_rank(t_rot.logits.float(), y_rot, self.tf_ratio)
        tf = kd_kl(s_rot.logits[keep_tf], t_rot.logits[keep_tf], self.tf_T)
        # ss: which normal image does each rotated view come from, by SS-module embeddings
        source = torch.arange(n, device=x.device).repeat_interleave(3)
        if self.frozen_teacher_head:
            self.teacher_head.eval()  # a frozen module: BN (if any) on its running statistics
            with torch.no_grad():
                t_sim = rotation_similarity(
                    self.teacher_head(t_rot.features["penultimate"]), self.teacher_head(teacher.features["penultimate"])
                )
        else:
            t_sim = rotation_similarity(
                self.teacher_head(t_rot.features["penultimate"].detach()),
                self.teacher_head(teacher.features["penultimate"].detach()),
            )
            ss_teacher = F.cross_entropy(t_sim, source)
        s_sim = rotation_similarity(
            self.student_head(s_rot.features["penultimate"]), self.student_head(student.features["penultimate"])
        )
        t_sim = t_sim.detach()
        keep_ss = keep_by_rank(t_sim, source, self.ss_ratio)
        ss = kd_kl(s_sim[keep_ss], t_sim[keep_ss], self.ss_T)
        if self.frozen_teacher_head:
            return {"kd": self.kd_weight * kd, "tf": self.tf_weight * tf, "ss": self.ss_weight * ss}
        ss_on = float(ctx.epoch >= self.teacher_epochs)
        return {
            "kd": self.kd_weight * kd,
            "tf": self.tf_weight * tf,
            "ss": ss_on * self.ss_weight * ss,
            "ss_teacher": ss_teacher,
        }


def load_teacher_head(head: ProjectionHead, path: str) -> None:
    """Load the SS module trained by :class:`~kd_lightning.methods.SSKDTeacherHead` (its ``head.*`` weights)."""
    from kd_lightning.checkpoints import load_checkpoint

    state = {k[len("head.") :]: v for k, v in load_checkpoint(path)["state_dict"].items() if k.startswith("head.")}
    ours = head.state_dict()
    if set(state) != set(ours) or any(state[k].shape != ours[k].shape for k in ours):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in ours.items()}
        raise CheckpointError(
            f"SSKD teacher_head {path!r} holds an SS module {got or 'of no kind (no head.* weights)'}; the teacher's "
            f"needs {want} (same teacher net and head_batch_norm; train it with SSKDTeacherHead)"
        )
    head.load_state_dict(state)
