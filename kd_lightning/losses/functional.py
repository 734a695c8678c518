"""Small functional pieces shared by the KD losses and the self-distillation methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_to_probs(student_logits: torch.Tensor, target_probs: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``KL(p || softmax(s / T))`` averaged over the batch (no ``T^2`` factor; callers scale).

    ``target_probs`` rows are probability vectors (zeros allowed: ``0 log 0 = 0``), e.g. a teacher's
    soft labels, last epoch's predictions, or mixed targets.
    """
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    p = target_probs.float()
    return (torch.xlogy(p, p) - p * log_q).sum(-1).mean()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean.

    The ``T^2`` keeps the gradient magnitude independent of the temperature.
    """
    return kl_to_probs(student_logits, F.softmax(teacher_logits.float() / T, dim=-1), T) * (T * T)
