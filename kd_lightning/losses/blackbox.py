"""Losses of the methods MEKD compares with (KN, AL, DAFL, AM, DB3KD): plain functions, one per term.

Each is small enough to check by hand (tests/test_blackbox_baselines.py does); the methods that use them live in
:mod:`kd_lightning.methods.blackbox_baselines`. They are not :class:`~kd_lightning.losses.KDLoss` subclasses (those
are the recipe-selectable losses of ``DistillModule``): these need a black-box teacher's answers, not its outputs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLScale = Literal["tau", "tau2", "none"]


def tempered_kl(student: torch.Tensor, teacher: torch.Tensor, T: float, scale: KLScale = "tau") -> torch.Tensor:
    """``c KL(softmax(t / T) || softmax(s / T))``, batch mean; ``c`` = T (MEKD's baseline scripts), T^2 or 1."""
    kl = F.kl_div(F.log_softmax(student.float() / T, -1), F.softmax(teacher.float() / T, -1), reduction="batchmean")
    return kl * {"tau": T, "tau2": T * T, "none": 1.0}[scale]


def soft_cross_entropy(student: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_c -p_ic log softmax(s_i)_c`` (Active Mixup's loss on the teacher's probabilities)."""
    return -(probs.float() * F.log_softmax(student.float(), -1)).sum(-1).mean()


def discriminator_loss(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """AL's discriminator: BCE(D(teacher) -> 1) + BCE(D(student) -> 0), on the discriminator's raw scores."""
    return F.binary_cross_entropy_with_logits(
        d_teacher, torch.ones_like(d_teacher)
    ) + F.binary_cross_entropy_with_logits(d_student, torch.zeros_like(d_student))


def fool_loss(d_student: torch.Tensor) -> torch.Tensor:
    """AL's student, in the minimax game: BCE(D(student) -> 1) (make its logits pass for the teacher's)."""
    return F.binary_cross_entropy_with_logits(d_student, torch.ones_like(d_student))


def dafl_losses(logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """DAFL's generator terms (Chen et al. 2019, eqs. 4-6) on the teacher's outputs for generated images.

    ``one_hot``: cross-entropy of the logits against their own argmax; ``activation``: ``-mean |f|`` of the
    teacher's penultimate features; ``entropy``: ``sum_c pbar_c log10 pbar_c`` with ``pbar`` the batch-mean
    probability (the negative information entropy; log base 10 as the DAFL and MEKD code).
    """
    logits = logits.float()
    pbar = F.softmax(logits, -1).mean(0)
    return {
        "one_hot": F.cross_entropy(logits, logits.argmax(-1)),
        "activation": -features.float().abs().mean(),
        "entropy": (pbar * torch.log10(pbar)).sum(),
    }


def boundary_soft_labels(distances: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """DB3KD's soft labels from decision-boundary distances (MEKD code's ``mode='bd'``).

    ``distances``: N x C, the distance from each sample to the teacher's boundary towards class c (``inf``
    where none was found; the own class's entry is ignored); ``own``: the teacher's class of each sample. Returns
    N x C scores: ``1 / d_c`` for the other classes and their sum for the own class (a softmax turns them into
    the target distribution).
    """
    inv = distances.float().reciprocal()
    inv = inv.masked_fill(~torch.isfinite(inv), 0.0)
    inv = inv.scatter(1, own.long().view(-1, 1), 0.0)
    return inv.scatter(1, own.long().view(-1, 1), inv.sum(1, keepdim=True))


def boundary_kl(student: torch.Tensor, scores: torch.Tensor, T: float) -> torch.Tensor:
    """DB3KD's loss: ``KL(softmax(scores) || softmax(s / T))``, batch mean (temperature on the student only)."""
    return F.kl_div(F.log_softmax(student.float() / T, -1), F.softmax(scores.float(), -1), reduction="batchmean")


__all__ = [
    "boundary_kl",
    "boundary_soft_labels",
    "dafl_losses",
    "discriminator_loss",
    "fool_loss",
    "soft_cross_entropy",
    "tempered_kl",
]
