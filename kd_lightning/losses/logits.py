"""Losses on class outputs: BLKD (Hinton et al.) and DKD (Zhao et al.)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, StepContext
from kd_lightning.losses.functional import kd_kl


class BLKD(KDLoss):
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    ``T^2 KL(softmax(t / T) || softmax(s / T))``. Defaults follow the CIFAR KD benchmarks
    (RepDistiller, also cGAN-KD's BLKD): ``T = 4``, weight 0.9 with the task loss weighted 0.1.

    Args:
        T: softmax temperature.
        weight: factor in the total loss.
    """

    uses_logits = True

    def __init__(self, T: float = 4.0, weight: float = 0.9) -> None:
        super().__init__(weight)
        if T <= 0:
            raise ConfigError(f"BLKD: T={T}; expected a positive temperature")
        self.T = T

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        return kd_kl(student.logits, teacher.logits, self.T)


class DKD(KDLoss):
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

    The KD loss split into target-class KD (TCKD: binary target / non-target probabilities) and
    non-target-class KD (NCKD: the distribution over the non-target classes, target masked out):
    ``alpha TCKD + beta NCKD``, both ``T^2``-scaled. Paper defaults on CIFAR-100: ``alpha = 1``,
    ``beta = 8``, ``T = 4``, and the DKD term ramped in linearly over the first 20 epochs.

    Args:
        alpha: weight of TCKD.
        beta: weight of NCKD.
        T: softmax temperature.
        warmup_epochs: epochs over which the term ramps from 0 to full weight.
        weight: factor in the total loss.
    """

    uses_logits = True

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup_epochs: int = 20, weight: float = 1.0
    ) -> None:
        super().__init__(weight)
        if T <= 0:
            raise ConfigError(f"DKD: T={T}; expected a positive temperature")
        self.alpha, self.beta, self.T, self.warmup_epochs = alpha, beta, T, warmup_epochs

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        s, t, y, T = student.logits.float(), teacher.logits.float(), batch["label"], self.T
        gt = F.one_hot(y, s.shape[-1]).bool()
        p_s, p_t = F.softmax(s / T, -1), F.softmax(t / T, -1)
        # binary (target, rest) distributions
        b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1).clamp_min(1e-12)
        b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1)
        tckd = (torch.xlogy(b_t, b_t) - b_t * b_s.log()).sum(-1).mean() * T * T
        # distribution over non-target classes: mask the target logit with a large negative value
        log_q_s = F.log_softmax(s / T - 1000.0 * gt, -1)
        q_t = F.softmax(t / T - 1000.0 * gt, -1)
        nckd = (torch.xlogy(q_t, q_t) - q_t * log_q_s).sum(-1).mean() * T * T
        ramp = 1.0 if ctx is None or self.warmup_epochs <= 0 else min(1.0, (ctx.epoch + 1) / self.warmup_epochs)
        return ramp * (self.alpha * tckd + self.beta * nckd)
