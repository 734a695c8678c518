"""AL: adversarial learning of portable students (Wang et al., AAAI 2018) against the black box."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal, cast

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import discriminator_loss, fool_loss, tempered_kl
from kd_lightning.methods.blackbox_baselines.base import PoolBaseline, need_responses, with_second_optimizer
from kd_lightning.methods.blackbox_student import BlackBoxStudent, answer_logits


def default_discriminator_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """AL's discriminator optimiser in MEKD's code: Adam, lr 0.01."""
    return torch.optim.Adam(params, lr=1e-2)


class LogitDiscriminator(nn.Module):
    """AL's discriminator on C logits: Linear(C, 512)-LReLU-Linear(512, 256)-LReLU-Linear(256, 1), raw scores."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_classes, 512), nn.LeakyReLU(0.2), nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1)
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits).squeeze(-1)


class AL(PoolBaseline):
    """Adversarial learning of portable students (Wang et al., AAAI 2018) against the black box, as MEKD's ``AL.py``.

    On each batch of queried local images: ``w_kl * T KL(softmax(t / T) || softmax(s / T)) + w_adv * L_adv``,
    with a discriminator D on logits telling the teacher's (centred ``log p``) from the student's (centred logits).
    ``adversarial``:

    - ``"official"`` (MEKD code): student and D minimise the same ``L_adv = BCE(D(t), 1) + BCE(D(s), 0)``, D's
      gradient scaled by ``w_adv`` as in the code's single backward pass;
    - ``"minimax"`` (the AL paper's game): D minimises ``BCE(D(t), 1) + BCE(D(s), 0)`` on detached logits, the
      student ``BCE(D(s), 1)``.

    Soft answers only. Manual optimisation: the student's optimiser/scheduler from the recipe, D's from
    ``discriminator_optimizer`` (MEKD code: Adam, lr 0.01).

    Args:
        T: temperature (MEKD code: 2).
        w_kl: weight of the KL (MEKD code: 0.5).
        w_adv: weight of the adversarial loss (MEKD code: 0.15).
        adversarial: ``"official"`` or ``"minimax"``.
        discriminator_optimizer: builds D's optimiser.
        **kwargs: see :class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent`.
    """

    hparams_ignore = (*BlackBoxStudent.hparams_ignore, "discriminator_optimizer")

    def __init__(
        self,
        T: float = 2.0,
        w_kl: float = 0.5,
        w_adv: float = 0.15,
        adversarial: Literal["official", "minimax"] = "official",
        discriminator_optimizer: OptimizerCallable = default_discriminator_optimizer,
        **kwargs: Any,
    ) -> None:
        need_responses(kwargs.get("responses", "soft"), "soft", "AL")
        if adversarial not in ("official", "minimax"):
            raise ConfigError(f"adversarial={adversarial!r}; expected 'official' or 'minimax'")
        if T <= 0 or w_kl < 0 or w_adv < 0:
            raise ConfigError(f"T={T}, w_kl={w_kl}, w_adv={w_adv}; expected T > 0 and weights >= 0")
        self.discriminator_factory = discriminator_optimizer
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def configure_models(self) -> None:
        super().configure_models()
        self.discriminator = LogitDiscriminator(int(self.hparams.num_classes))

    def trainable_parameters(self) -> Iterator[torch.Tensor]:
        ids = {id(p) for p in self.discriminator.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in ids)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        student = super().configure_optimizers()
        d_opt = self.discriminator_factory(self.discriminator.parameters())
        return with_second_optimizer(student, d_opt)

    def al_parts(self, s: torch.Tensor, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the student's loss parts, D's loss) for centred student logits ``s`` and teacher logits ``t``."""
        hp = self.hparams
        kl = tempered_kl(s, t, hp.T, "tau")
        if hp.adversarial == "official":
            adv = discriminator_loss(self.discriminator(t), self.discriminator(s))
            return {"kl": hp.w_kl * kl, "adv": hp.w_adv * adv}, hp.w_adv * adv
        d = discriminator_loss(self.discriminator(t), self.discriminator(s.detach()))
        return {"kl": hp.w_kl * kl, "adv": hp.w_adv * fool_loss(self.discriminator(s))}, d

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        s_opt, d_opt = cast(list, self.optimizers())
        x = self.client.prepare(batch["image"].detach())
        t = answer_logits(self.client.query(x), "soft", self.hparams.num_classes).to(x.device)
        student = self(x)
        s = student - student.mean(-1, keepdim=True)
        parts, d_loss = self.al_parts(s, t)
        loss = parts["kl"] + parts["adv"]
        s_opt.zero_grad()
        d_opt.zero_grad()
        if self.hparams.adversarial == "official":  # one backward, both step (the code's shared objective)
            self.manual_backward(loss)
        else:
            self.manual_backward(d_loss, inputs=list(self.discriminator.parameters()))
            self.manual_backward(loss, inputs=list(self.trainable_parameters()))
        s_opt.step()
        d_opt.step()
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=True)
        self.log("train/discriminator", d_loss.detach(), on_step=True, on_epoch=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        sched = self.lr_schedulers()
        if sched is not None:
            for s in sched if isinstance(sched, list) else [sched]:
                s.step()  # type: ignore[call-arg]


__all__ = ["AL", "LogitDiscriminator", "default_discriminator_optimizer"]
