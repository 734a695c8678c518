"""DAFL: data-free learning of student networks (Chen et al., ICCV 2019), white-box as in MEKD's table."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.types import OptimizerLRScheduler

from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import dafl_losses, tempered_kl
from kd_lightning.methods.blackbox_baselines.base import with_second_optimizer
from kd_lightning.methods.blackbox_student import BlackBoxStudent
from kd_lightning.teachers.client import QueryBudgetExceeded


def default_generator_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """DAFL's generator optimiser in the DAFL and MEKD code: Adam, lr 0.2."""
    return torch.optim.Adam(params, lr=0.2)


class DAFL(BlackBoxStudent):
    """Data-free learning of student networks (Chen et al., ICCV 2019): WHITE-BOX, as in MEKD's table.

    DAFL trains its generator through the teacher's gradients and penultimate features, which no black box gives;
    MEKD's table runs it white-box ("0K" data), and so does this class: ``teacher`` must be a checkpoint (loaded as
    a frozen white-box net), never a URL. A generator (:class:`~kd_lightning.gans.dafl.DAFLGenerator`) makes
    images in the teacher's normalised space from fresh z ~ N(0, I) each step; it minimises
    ``oh * L_oh + ie * L_ie + a * L_a`` (:func:`~kd_lightning.losses.blackbox.dafl_losses`) while the student learns
    ``KL(softmax(t) || softmax(s))`` on the detached images. No real image is used for training (the pool only sets
    the number of steps and the batch size: use ``pool: latent``). The images shown to the teacher are counted and
    held to ``query_budget`` like queries (logged as ``queries/spent``); there is no journal (nothing is paid to an
    API and the images change every step).

    Args:
        teacher: the teacher's classifier checkpoint (white-box).
        z_dim: latent size (DAFL: 100).
        oh: weight of the one-hot loss (1).
        ie: weight of the information-entropy loss (MEKD code: 5).
        a: weight of the activation loss (0.1).
        generator_optimizer: builds the generator's optimiser (MEKD code: Adam, lr 0.2).
        **kwargs: see :class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent` (the student's optimiser:
            MEKD code, Adam lr 2e-3 on MNIST, SGD lr 0.1 otherwise; ``responses`` is ignored).
    """

    pool = "latent"
    hparams_ignore = (*BlackBoxStudent.hparams_ignore, "generator_optimizer")

    def __init__(
        self,
        teacher: str,
        z_dim: int = 100,
        oh: float = 1.0,
        ie: float = 5.0,
        a: float = 0.1,
        generator_optimizer: OptimizerCallable = default_generator_optimizer,
        **kwargs: Any,
    ) -> None:
        if str(teacher).startswith(("http://", "https://")):
            raise ConfigError(
                f"DAFL is white-box (it back-propagates through the teacher and reads its features): "
                f"teacher={teacher!r} must be the teacher's checkpoint, not a URL"
            )
        if z_dim < 1 or min(oh, ie, a) < 0:
            raise ConfigError(f"z_dim={z_dim}, oh={oh}, ie={ie}, a={a}; expected z_dim >= 1 and weights >= 0")
        self.generator_factory = generator_optimizer
        super().__init__(teacher=teacher, **kwargs)
        self.automatic_optimization = False
        self.shown = 0  # images shown to the teacher in this process

    def configure_models(self) -> None:
        super().configure_models()
        from kd_lightning.gans.dafl import DAFLGenerator
        from kd_lightning.teachers.frozen import FrozenTeacher

        hp = self.hparams
        self.white_teacher = FrozenTeacher.from_checkpoint(hp.teacher)
        self.white_teacher.check_compatible("classification", hp.num_classes, hp.in_channels, "the student")
        self.generator = DAFLGenerator(hp.z_dim, hp.image_size, hp.in_channels)

    def trainable_parameters(self) -> Iterator[torch.Tensor]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        student = super().configure_optimizers()
        g_opt = self.generator_factory(self.generator.parameters())
        return with_second_optimizer(student, g_opt)

    def on_fit_start(self) -> None:  # no black-box client: the teacher is white-box
        from kd_lightning.nets import FeatureExtractor

        self._features = FeatureExtractor(self.white_teacher.net, ["penultimate"])

    def on_fit_end(self) -> None:
        self._features.close()

    def on_train_epoch_end(self) -> None:
        sched = self.lr_schedulers()
        if sched is not None:
            for s in sched if isinstance(sched, list) else [sched]:
                s.step()  # type: ignore[call-arg]

    def on_validation_epoch_end(self) -> None:
        self.log("queries/spent", float(self.shown))

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        """Generator output (the teacher's normalised space) as the [0, 1]-scale images our nets normalise."""
        norm = self.white_teacher.normalize
        return x * norm.std.view(1, -1, 1, 1) + norm.mean.view(1, -1, 1, 1)

    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits and penultimate features, with gradients flowing back to ``images``."""
        out, feats = self._features(self.white_teacher.normalize(images))
        return out, feats["penultimate"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        n = len(batch["z"])
        if hp.query_budget is not None and self.shown + n > hp.query_budget:
            raise QueryBudgetExceeded(
                f"DAFL: showing {n} more images to the teacher would exceed query_budget={hp.query_budget} "
                f"({self.shown} shown)"
            )
        s_opt, g_opt = cast(list, self.optimizers())
        images = self.to_unit_range(self.generator(torch.randn(n, hp.z_dim, device=self.device)))
        logits, feats = self.teacher_outputs(images)
        self.shown += n
        parts = dafl_losses(logits, feats)
        g_loss = hp.oh * parts["one_hot"] + hp.ie * parts["entropy"] + hp.a * parts["activation"]
        kd = tempered_kl(self(images.detach()), logits.detach(), 1.0, "none")
        s_opt.zero_grad()
        g_opt.zero_grad()
        self.manual_backward(g_loss + kd)  # separable: kd reaches only the student, g_loss only the generator
        g_opt.step()
        s_opt.step()
        self.log("train/loss", kd.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=True)
        return kd.detach()


__all__ = ["DAFL", "default_generator_optimizer"]
