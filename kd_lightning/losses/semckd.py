"""SemCKD (Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021; Wang et al. TKDE 2022)."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.losses.features import _stage_names, pool_to


class MLPEmbed(nn.Sequential):
    """Linear-ReLU-Linear to ``dim``, rows L2-normalised: the query / key projection."""

    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__(nn.Linear(dim_in, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x), dim=1)


def projector(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv - BN - ReLU - 3x3 conv - BN - ReLU - 1x1 conv, ``2 cout`` middle channels (SemCKD's regressor)."""
    mid = 2 * cout
    return nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, 1, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 1, bias=False),
    )


def batch_similarity(f: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of the in-batch Gram matrix ``F F^T`` of the flattened maps, zero-padded to ``width`` columns."""
    g = f.float().flatten(1) @ f.float().flatten(1).t()
    return F.pad(g, (0, width - g.shape[1]))


class SemCKD(KDLoss):
    """Semantic calibration for cross-layer KD: every student stage learns from every teacher stage.

    For student stage ``i`` and teacher stage ``j`` a projector maps the student map to the teacher's
    channels (the larger map is average-pooled to the other's size) and ``d_ij`` is the per-sample
    MSE. Each sample's rows of the in-batch similarity matrix of each stage are embedded by MLPs
    into a query (student stages) and a key (teacher stages); ``alpha_i = softmax_j(q_i . k_j)``. The
    loss is ``sum_j alpha_ij d_ij``, averaged over samples and student stages. Default weight 400
    (the official CIFAR-100 setting), task loss 1.

    The similarity rows have one entry per sample of the batch, so the MLPs take ``batch_size``
    inputs; a smaller batch (the last one of an epoch) is zero-padded, a larger one is refused.

    Args:
        batch_size: the training batch size (input width of the query/key MLPs).
        factor: the query/key dimension is ``batch_size // factor``.
        weight: factor in the total loss.
    """

    def __init__(self, batch_size: int = 64, factor: int = 4, weight: float = 400.0) -> None:
        super().__init__(weight)
        if batch_size < 2 or factor < 1 or batch_size // factor < 1:
            raise ConfigError(f"SemCKD: batch_size={batch_size}, factor={factor}; expected batch_size // factor >= 1")
        self.batch_size, self.factor = batch_size, factor

    def setup(self, info: SetupInfo) -> None:
        s_names, t_names = _stage_names(info.student_shapes), _stage_names(info.teacher_shapes)
        if not s_names or not t_names:
            raise ConfigError(
                f"SemCKD: the student declares {len(s_names)} stages and the teacher {len(t_names)}; both need some"
            )
        s_shapes = [require_shape(self, "student", info.student_shapes, n, 3) for n in s_names]
        t_shapes = [require_shape(self, "teacher", info.teacher_shapes, n, 3) for n in t_names]
        dim = self.batch_size // self.factor
        self.queries = nn.ModuleList(MLPEmbed(self.batch_size, dim) for _ in s_names)
        self.keys = nn.ModuleList(MLPEmbed(self.batch_size, dim) for _ in t_names)
        self.projectors = nn.ModuleList(nn.ModuleList(projector(s[0], t[0]) for t in t_shapes) for s in s_shapes)
        self.student_features, self.teacher_features = tuple(s_names), tuple(t_names)

    def attention(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> torch.Tensor:
        """``b x S x T`` weights: softmax over teacher stages of query . key."""
        b = s_feats[0].shape[0]
        if b > self.batch_size:
            raise ConfigError(f"SemCKD: a batch of {b} samples is larger than batch_size={self.batch_size}")
        q = torch.stack([m(batch_similarity(f, self.batch_size)) for m, f in zip(self.queries, s_feats)], 1)
        k = torch.stack([m(batch_similarity(f.detach(), self.batch_size)) for m, f in zip(self.keys, t_feats)], 1)
        return F.softmax(q @ k.transpose(1, 2), dim=-1)

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        s_feats = [student.features[n] for n in self.student_features]
        t_feats = [teacher.features[n].detach() for n in self.teacher_features]
        att = self.attention(s_feats, t_feats)
        dists = []
        for s, row in zip(s_feats, self.projectors):
            per = []
            for t, proj in zip(t_feats, cast(nn.ModuleList, row)):
                if s.shape[-1] > t.shape[-1]:
                    src, tgt = pool_to(s, t), t
                else:
                    src, tgt = s, pool_to(t, s)
                per.append((proj(src).float() - tgt.float()).pow(2).flatten(1).mean(1))
            dists.append(torch.stack(per, 1))
        d = torch.stack(dists, 1)  # b x S x T
        return (att * d).sum(-1).mean()
