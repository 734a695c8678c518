"""The self-KD baselines AI-KD compares with, as defaults of :class:`~kd_lightning.methods.self_kd.SelfKD`.

:class:`PSKD` (progressive self-knowledge distillation), :class:`CSKD` (class-wise self-KD) and :class:`TFKD`
(teacher-free KD, both variants) set only default weights and temperatures; their loss is ``SelfKD``'s.
"""

from __future__ import annotations

from typing import Any, Literal

from kd_lightning.errors import ConfigError
from kd_lightning.methods.self_kd import SelfKD


class PSKD(SelfKD):
    """PS-KD (Kim et al. 2021): targets ``(1 - a_t) y + a_t p_{t-1}``, ``a_t = 0.8 (t + 1) / max_epochs``.

    Its soft-target cross-entropy equals ``(1 - a_t) CE + a_t KL(p_{t-1} || p_t)`` plus a constant,
    so it is :class:`SelfKD` with a ramped progressive term at tau_P = 1.

    Args:
        progressive_weight: alpha_T (0.8). progressive_ramp: the linear ramp (on).
        **kwargs: see :class:`SelfKD`.
    """

    def __init__(self, progressive_weight: float = 0.8, progressive_ramp: bool = True, **kwargs: Any) -> None:
        super().__init__(progressive_weight=progressive_weight, progressive_ramp=progressive_ramp, **kwargs)


class CSKD(SelfKD):
    """CS-KD (Yun et al. 2020): ``CE + lambda T^2 KL(p(x') || p(x))`` with x' of the same class.

    Needs ``data.init_args.class_pairs: true``. As in the official code, the partners' predictions
    come from a no-gradient forward pass in training mode and CE is on the anchors only.

    Args:
        class_wise_weight: lambda (1). class_wise_temperature: T (4).
        **kwargs: see :class:`SelfKD`.
    """

    def __init__(self, class_wise_weight: float = 1.0, class_wise_temperature: float = 4.0, **kwargs: Any) -> None:
        super().__init__(class_wise_weight=class_wise_weight, class_wise_temperature=class_wise_temperature, **kwargs)


class TFKD(SelfKD):
    """TF-KD (Yuan et al. 2020), both variants of the official code.

    - ``self`` (self-training): ``(1 - a) CE + a T^2 KL(p_pre || p_t)`` from a pre-trained copy; defaults a = 0.95,
      T = 6 (the official ResNet-18 self-teacher setting; DenseNet-121's is a = 0.9, T = 20).
    - ``regularization`` (TF-KD_reg): ``(1 - a) CE + a KL(p^d_T || p_t(T))`` with the manually designed teacher
      ``p^d`` (true class 0.99, the rest uniform; :func:`designed_teacher`); defaults a = 0.1, T = 20 (the
      official ResNet-18 setting); needs no pre-trained copy.

    The KL is the usual batch mean by default; the official code's scale is ``guide_reduction: mean`` (also
    averaged over classes) with ``guide_multiplier`` 50 (self) or 100 (regularization), i.e. the official KD term
    is multiplier / C times ours (C = number of classes).

    Args:
        pretrained: ``kdl`` checkpoint of the pre-trained copy (same net and classes; ``self`` only).
        variant: ``self`` or ``regularization``.
        guide_weight: a (default 0.95 for ``self``, 0.1 for ``regularization``).
        guide_temperature: T (default 6 for ``self``, 20 for ``regularization``).
        **kwargs: see :class:`SelfKD`.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        variant: Literal["self", "regularization"] = "self",
        guide_weight: float | None = None,
        guide_temperature: float | None = None,
        **kwargs: Any,
    ) -> None:
        if variant not in ("self", "regularization"):
            raise ConfigError(f"TFKD variant={variant!r}; expected 'self' or 'regularization'")
        reg = variant == "regularization"
        kwargs["guide_target"] = "designed" if reg else kwargs.get("guide_target", "pretrained")
        # rebound here, not only passed on: save_hyperparameters reads this frame's values too
        guide_weight = (0.1 if reg else 0.95) if guide_weight is None else guide_weight
        guide_temperature = (20.0 if reg else 6.0) if guide_temperature is None else guide_temperature
        super().__init__(
            pretrained=pretrained, guide_weight=guide_weight, guide_temperature=guide_temperature, **kwargs
        )


__all__ = ["CSKD", "PSKD", "TFKD"]
