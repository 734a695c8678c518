"""BlackBoxKD: KD, hard-label KD, ML and DKD on queried images, at the same budget as MEKD."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses import BLKD, DKD
from kd_lightning.losses.base import Outputs
from kd_lightning.methods.blackbox_student import BlackBoxStudent, answer_logits, check_choice


class BlackBoxKD(BlackBoxStudent):
    """Baselines on queried local images, same budget and framework as :class:`~kd_lightning.methods.MEKD`.

    ``method``:

    - ``"kd"`` — soft answers: Hinton's KD (:class:`~kd_lightning.losses.BLKD` at temperature ``T`` on the centred
      ``log p``); hard answers: cross-entropy on the teacher's class (hard-label KD);
    - ``"ml"`` — Ba & Caruana: mean squared error between the student's and the teacher's centred logits (soft only);
    - ``"dkd"`` — :class:`~kd_lightning.losses.DKD` with the teacher's class as the target (soft only; no ground truth).

    Args:
        method: ``"kd"``, ``"ml"`` or ``"dkd"``.
        T: temperature of KD/DKD.
        dkd_alpha: DKD's TCKD weight.
        dkd_beta: DKD's NCKD weight.
        dkd_warmup_epochs: DKD's linear ramp.
        **kwargs: see :class:`BlackBoxStudent`.
    """

    def __init__(
        self,
        method: Literal["kd", "ml", "dkd"] = "kd",
        T: float = 4.0,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        dkd_warmup_epochs: int = 20,
        **kwargs: Any,
    ) -> None:
        check_choice("method", method, ("kd", "ml", "dkd"))
        if method != "kd" and kwargs.get("responses", "soft") == "hard":
            raise ConfigError(f"method={method!r} needs soft answers (probabilities); with hard answers use 'kd'")
        super().__init__(**kwargs)

    def configure_losses(self) -> None:
        super().configure_losses()
        hp = self.hparams
        self.blkd = BLKD(T=hp.T, weight=1.0)
        self.dkd = DKD(alpha=hp.dkd_alpha, beta=hp.dkd_beta, T=hp.T, warmup_epochs=hp.dkd_warmup_epochs)

    def distill_loss(self, x: torch.Tensor, student: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        if hp.responses == "hard":
            return {"ce": F.cross_entropy(student, answers.long().to(student.device))}
        t = answer_logits(answers, "soft", hp.num_classes).to(student.device)
        if hp.method == "kd":
            return {"kd": self.blkd(Outputs(student), Outputs(t), {})}
        if hp.method == "ml":
            return {"ml": F.mse_loss(student - student.mean(-1, keepdim=True), t)}
        from kd_lightning.losses.base import StepContext

        ctx = StepContext(self, self, epoch=self.current_epoch)
        return {"dkd": self.dkd(Outputs(student), Outputs(t), {"label": t.argmax(-1)}, ctx)}


__all__ = ["BlackBoxKD"]
