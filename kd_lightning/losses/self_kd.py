"""Self-distillation terms: the student learns from itself (a pre-trained copy, its last epoch, a same-class partner).

Each term is a :class:`SelfKDTerm`, a :class:`~kd_lightning.losses.base.KDLoss` that :class:`~kd_lightning.methods.
self_kd.SelfKD` computes on every training batch with:

- ``student``: the student's outputs on the (possibly mixed) batch;
- ``teacher``: the outputs of S_sup, the frozen pre-trained copy, on the same images (``None`` without one);
- ``batch``: the training batch plus ``mixed`` (the :class:`~kd_lightning.data.mixing.MixedBatch`, whose
  ``mix_targets`` mixes per-sample targets like the images) and ``pair_logits`` (the CS-KD partners' logits, or
  ``None``).

A term's ``weight`` is its factor in the student's loss; a term with ``shares_ce_weight`` takes it from the
cross-entropy's (CE weight ``1 - sum`` of those terms' weights, as AI-KD and PS-KD write their objectives).
Adding a term is one class here plus its golden test; ``SelfKD(terms=[...])`` trains with it.

These terms are not in :func:`~kd_lightning.losses.list_losses` (which lists the teacher-student losses that
``DistillModule`` takes): :func:`list_self_kd_terms` names them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, StepContext
from kd_lightning.losses.functional import kd_kl, kl_to_probs
from kd_lightning.per_sample import PerSampleStore

GuideTarget = Literal["pretrained", "designed"]
KLReduction = Literal["batchmean", "mean"]


def designed_teacher(label: torch.Tensor, num_classes: int, correct_prob: float, temperature: float) -> torch.Tensor:
    """TF-KD_reg's manually designed teacher at temperature tau: ``softmax(p^d / tau)``.

    ``p^d(k) = a`` for the true class and ``(1 - a) / (K - 1)`` for the others (the official code softens p^d,
    a probability vector, with the softmax at tau).
    """
    p_d = torch.full((len(label), num_classes), (1.0 - correct_prob) / (num_classes - 1), device=label.device)
    p_d.scatter_(1, label.long().view(-1, 1), correct_prob)
    return F.softmax(p_d / temperature, dim=-1)


def check_temperature(owner: str, value: float) -> None:
    """A clear error when temperature ``owner`` is not positive."""
    if value <= 0:
        raise ConfigError(f"{owner}={value}; expected a temperature > 0")


def check_guide_settings(T: float, target: str, correct_prob: float, reduction: str, multiplier: float) -> None:
    """The checks of :class:`GuideKL`'s settings, named as ``SelfKD``'s arguments (it runs them before building)."""
    check_temperature("guide_temperature", T)
    if target not in ("pretrained", "designed"):
        raise ConfigError(f"guide_target={target!r}; expected 'pretrained' or 'designed'")
    if reduction not in ("batchmean", "mean"):
        raise ConfigError(f"guide_reduction={reduction!r}; expected 'batchmean' or 'mean'")
    if not 0.0 < correct_prob < 1.0:
        raise ConfigError(f"designed_correct_prob={correct_prob}; expected a probability in (0, 1)")
    if multiplier < 0:
        raise ConfigError(f"guide_multiplier={multiplier}; expected a weight >= 0")


class SelfKDTerm(KDLoss):
    """Base class of the self-distillation terms (see the module doc for what ``forward`` receives).

    Args:
        weight: factor of the term in the student's loss (its final value when the term ramps).
    """

    uses_logits = True
    for_distill = False
    #: the term's weight is taken from the cross-entropy's (CE weight = 1 - the sum of these)
    shares_ce_weight: bool = False
    #: needs S_sup's outputs as ``teacher``
    needs_teacher: bool = False
    #: needs same-class partners (``batch["pair_logits"]``; ``data.init_args.class_pairs: true``)
    needs_pairs: bool = False

    def weight_at(self, epoch: int, max_epochs: int | None) -> float:
        """The term's weight in ``epoch`` (0-based) of ``max_epochs``; constant unless the term ramps."""
        return self.weight

    def after_step(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Called after the student's optimiser step with the batch's indices and the student's clean logits."""

    def forward(
        self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


class GuideKL(SelfKDTerm):
    """Guide term: ``tau^2 KL(p_sup(x; tau) || p_t(x; tau))`` to the frozen pre-trained copy S_sup.

    AI-KD's a_G term and TF-KD's self-training; or to TF-KD_reg's manually designed teacher
    (``target: designed``), whose term is ``KL(p^d_tau || p_t(x; tau))`` without ``tau^2`` (TF-KD Eq. 9 and its
    code).

    Args:
        T: tau_G.
        weight: a_G (taken from the cross-entropy's weight).
        target: ``pretrained`` (S_sup) or ``designed`` (:func:`designed_teacher`; needs no S_sup).
        correct_prob: a of the designed teacher.
        tempered_student: the student at tau in the designed term (the paper's ``p_tau``); the official code
            compares with the student's plain ``log_softmax`` (false).
        reduction: ``batchmean`` (KL summed over classes, averaged over the batch) or ``mean`` (also averaged over
            classes: ``nn.KLDivLoss()``'s default, which TF-KD's official code uses).
        multiplier: factor on the term (TF-KD's ``multiplier``).
    """

    shares_ce_weight = True

    def __init__(
        self,
        T: float = 3.0,
        weight: float = 0.1,
        target: GuideTarget = "pretrained",
        correct_prob: float = 0.99,
        tempered_student: bool = True,
        reduction: KLReduction = "batchmean",
        multiplier: float = 1.0,
    ) -> None:
        super().__init__(weight)
        check_guide_settings(T, target, correct_prob, reduction, multiplier)
        self.T, self.target, self.correct_prob = T, target, correct_prob
        self.tempered_student, self.reduction, self.multiplier = tempered_student, reduction, multiplier
        self.needs_teacher = target == "pretrained"

    @property
    def name(self) -> str:
        return "guide"

    def forward(
        self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        logits = student.logits
        if self.target == "designed":
            mixed = batch["mixed"]
            target = mixed.mix_targets(designed_teacher(mixed.label, logits.shape[-1], self.correct_prob, self.T))
            value = kl_to_probs(logits, target, self.T if self.tempered_student else 1.0)
        else:
            if teacher is None:
                raise ConfigError("the guide term (target: pretrained) needs S_sup's outputs: set `pretrained`")
            value = kd_kl(logits, teacher.logits, self.T)
        if self.reduction == "mean":
            value = value / logits.shape[-1]
        return value * self.multiplier


class ProgressiveKL(SelfKDTerm):
    """Progressive term: ``tau^2 KL(p_{t-1}(x; tau) || p_t(x; tau))`` to each sample's last logits.

    The logits each sample got when it was last trained on (PS-KD; AI-KD's a_P term), kept in a
    :class:`~kd_lightning.per_sample.PerSampleStore` keyed by ``batch["index"]`` (field ``logits``; saved in
    checkpoints as this module's extra state).

    A sample with no stored prediction yet (all of epoch 0) gets its one-hot label as target, as in PS-KD's code.
    Under Mixup/CutMix the targets of the two source images are mixed like the images.

    Args:
        num_classes: classes of the student.
        T: tau_P.
        weight: a_P, its final value when ramped (taken from the cross-entropy's weight).
        ramp: PS-KD's schedule ``a_P(t) = a_P (t + 1) / max_epochs``; else constant.
    """

    shares_ce_weight = True
    uses_indices = True

    def __init__(self, num_classes: int, T: float = 1.0, weight: float = 0.3, ramp: bool = False) -> None:
        super().__init__(weight)
        check_temperature("progressive_temperature", T)
        self.T, self.ramp, self.num_classes = T, ramp, num_classes
        self.store = PerSampleStore(name="the progressive term's store of last predictions")

    @property
    def name(self) -> str:
        return "progressive"

    def weight_at(self, epoch: int, max_epochs: int | None) -> float:
        if not self.ramp or not max_epochs or max_epochs < 1:
            return self.weight
        return self.weight * min(1.0, (epoch + 1) / max_epochs)

    @torch.no_grad()
    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, seen)`` of the samples ``index``; unseen rows are zeros with ``seen`` False."""
        seen = self.store.contains(index)
        if "logits" not in self.store.fields:
            return torch.zeros(len(seen), self.num_classes, device=seen.device), seen
        return self.store.read(index, "logits"), seen

    @torch.no_grad()
    def targets(self, index: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``softmax(stored / T)`` for seen samples, the one-hot label for the others."""
        logits, seen = self.lookup(index)
        probs = F.softmax(logits / self.T, dim=-1)
        one_hot = F.one_hot(label.long(), self.num_classes).float().to(probs.device)
        return torch.where(seen.unsqueeze(-1), probs, one_hot)

    def forward(
        self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        target = batch["mixed"].mix_targets(self.targets(batch["index"], batch["label"]))
        return kl_to_probs(student.logits, target, self.T) * (self.T * self.T)

    def after_step(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        self.store.write(index, logits=logits.detach().float())

    def get_extra_state(self) -> dict[str, Any]:
        return self.store.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        logits = state["fields"].get("logits")
        if logits is not None and logits.shape[-1] != self.num_classes:
            raise CheckpointError(
                f"the checkpoint's store of last predictions has {logits.shape[-1]} classes; "
                f"this model has num_classes={self.num_classes}"
            )
        self.store.load_state_dict(state)


class ClassWiseKL(SelfKDTerm):
    """Class-wise term (CS-KD): ``T^2 KL(p(x'; T) || p(x; T))`` to a same-class partner x'.

    The partner's logits come from a no-gradient forward pass of the student in training mode, as in CS-KD's code.

    Args:
        T: the temperature.
        weight: lambda, added on top of the cross-entropy's weight.
    """

    needs_pairs = True

    def __init__(self, T: float = 4.0, weight: float = 1.0) -> None:
        super().__init__(weight)
        check_temperature("class_wise_temperature", T)
        self.T = T

    @property
    def name(self) -> str:
        return "class_wise"

    def forward(
        self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        pair = batch.get("pair_logits")
        if pair is None:
            raise ConfigError("the class-wise term needs same-class partners: set data.init_args.class_pairs: true")
        return kd_kl(student.logits, pair.detach(), self.T)


def _terms() -> dict[str, type[SelfKDTerm]]:
    found: dict[str, type[SelfKDTerm]] = {}
    todo = list(SelfKDTerm.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("kd_lightning.") and not cls.__name__.startswith("_"):
            found[cls.__name__] = cls
    return found


def list_self_kd_terms() -> list[str]:
    """Names of the self-distillation terms (the subclasses of :class:`SelfKDTerm` in kd_lightning)."""
    return sorted(_terms())


__all__ = [
    "ClassWiseKL",
    "GuideKL",
    "ProgressiveKL",
    "SelfKDTerm",
    "designed_teacher",
    "list_self_kd_terms",
]
