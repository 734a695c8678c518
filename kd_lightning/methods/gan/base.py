"""The adversarial loop shared by kd_lightning's GANs (:class:`GANTask`), as a LightningModule with manual optimisation.

Each training step is one discriminator update on the batch; every ``n_critic``-th step is followed by ``n_gen``
generator updates (so ``global_step`` counts D and G updates alike). Both optimisers are injected
(``generator_optimizer``/``discriminator_optimizer``), DiffAugment is applied to real and fake images in every
discriminator pass when ``diffaugment`` is set, gradients are clipped with ``self.clip_gradients`` when
``gradient_clip_val`` is set, and an exponential moving average of the generator (``generator_ema``) is kept for
sampling. Everything (both nets, the EMA copy, both optimiser states, the step counter) is in the checkpoint, so
``--ckpt_path last`` resumes exactly. The named loss parts are logged before every backward pass
(``train/d/real``, ``train/d/fake``, ``train/g_loss``) so the NaN guard can name the one that broke.

The families that choose the nets and the losses: :mod:`kd_lightning.methods.gan.image` (``ConditionalGAN``,
``DCGAN``) and :mod:`kd_lightning.methods.gan.ccgan` (``CcGAN`` and its ``LabelEmbedding`` stage). Images are in
[0, 1] in batches and in :meth:`Generator.sample`; the nets work in [-1, 1].
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.gans import (
    DiffAugment,
    Generator,
)
from kd_lightning.gans.losses import LossType
from kd_lightning.methods.base import BaseTask


def gan_adam(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """Adam, lr 2e-4, betas (0, 0.999): BigGAN/cGAN-KD's optimiser of the generator and of the discriminator."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.0, 0.999))


class GANTask(BaseTask):
    """Shared adversarial loop, EMA generator and DiffAugment; subclasses build the nets and the losses.

    Args:
        z_dim: latent dimension (z ~ N(0, I)).
        g_ch: generator base width.
        d_ch: discriminator base width.
        loss: ``"hinge"`` or ``"vanilla"`` (non-saturating BCE).
        n_critic: discriminator steps per generator phase (one per batch).
        n_gen: generator steps per generator phase.
        ema_decay: decay of the EMA generator (0 disables averaging: the EMA copy follows the generator).
        ema_start: generator steps before averaging starts (the EMA copy is the generator until then).
        ema_buffers: ``average`` (BigGAN's ``ema.update``: the whole state dict is averaged, BN running
            statistics included; integer buffers such as ``num_batches_tracked`` are copied) or ``copy`` (only
            the parameters are averaged, buffers are copied from the generator).
        diffaugment: DiffAugment policy, e.g. ``"color,translation,cutout"``; ``""`` disables it.
        gradient_clip_val: clip each net's gradient norm to this value (manual optimisation
            cannot use the Trainer's ``gradient_clip_val``); ``None`` disables clipping.
        generator_optimizer: builds the generator's optimiser.
        discriminator_optimizer: builds the discriminator's optimiser.
        **kwargs: see :class:`~kd_lightning.methods.base.BaseTask` (the data facts are linked by
            ``kdl``; its ``optimizer``/``lr_scheduler`` are not used by GANs).
    """

    monitor = None  # no validation metric: checkpoints keep the latest state
    monitor_mode = "min"
    condition = "class"
    hparams_ignore = (*BaseTask.hparams_ignore, "generator_optimizer", "discriminator_optimizer")

    def __init__(
        self,
        z_dim: int = 128,
        g_ch: int = 64,
        d_ch: int = 64,
        loss: LossType = "hinge",
        n_critic: int = 1,
        n_gen: int = 1,
        ema_decay: float = 0.999,
        ema_start: int = 0,
        ema_buffers: Literal["average", "copy"] = "average",
        diffaugment: str = "",
        gradient_clip_val: float | None = None,
        generator_optimizer: OptimizerCallable = gan_adam,
        discriminator_optimizer: OptimizerCallable = gan_adam,
        **kwargs: Any,
    ) -> None:
        for name, value in (("z_dim", z_dim), ("g_ch", g_ch), ("d_ch", d_ch), ("n_critic", n_critic), ("n_gen", n_gen)):
            if value < 1:
                raise ConfigError(f"{name}={value}; expected a positive integer")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"ema_decay={ema_decay}; expected a number in [0, 1)")
        if loss not in ("hinge", "vanilla"):
            raise ConfigError(f"loss={loss!r}; expected 'hinge' or 'vanilla'")
        if ema_buffers not in ("average", "copy"):
            raise ConfigError(f"ema_buffers={ema_buffers!r}; expected 'average' (BigGAN) or 'copy'")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ConfigError(f"gradient_clip_val={gradient_clip_val}; expected a positive number or null")
        if kwargs.get("lr_scheduler") is not None:
            raise ConfigError(
                "lr_scheduler is not used by GANs (two optimisers, stepped by hand); the papers keep the learning "
                "rates constant: remove model.init_args.lr_scheduler"
            )
        self.generator_optimizer_factory = generator_optimizer
        self.discriminator_optimizer_factory = discriminator_optimizer
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.augment = DiffAugment(diffaugment)
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("g_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ models
    generator: Generator
    discriminator: nn.Module
    generator_ema: Generator
    d_steps: torch.Tensor  # buffers: discriminator and generator steps taken
    g_steps: torch.Tensor

    def configure_models(self) -> None:
        self.generator, self.discriminator = self.build_nets()
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def build_nets(self) -> tuple[Generator, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> Iterable[torch.Tensor]:  # pragma: no cover - not used by GANs
        raise NotImplementedError("GANs have two optimisers; see configure_optimizers")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        g = self.generator_optimizer_factory([p for p in self.generator.parameters() if p.requires_grad])
        d = self.discriminator_optimizer_factory([p for p in self.discriminator.parameters() if p.requires_grad])
        return [g, d]

    def check_data(self, dm: L.LightningDataModule) -> None:
        super().check_data(dm)
        size = getattr(dm, "image_size", None)
        if size is not None and size != self.hparams.image_size:
            raise ConfigError(f"model has image_size={self.hparams.image_size} but {type(dm).__name__} has {size}")

    # ------------------------------------------------------------------ sampling
    def sampler_generator(self, ema: bool = True) -> Generator:
        """The generator used for samples: the EMA copy (default) or the raw one."""
        return self.generator_ema if ema else self.generator

    def sample(self, labels: torch.Tensor | Sequence[float] | int, **kwargs: Any) -> torch.Tensor:
        """Images in [0, 1] from the EMA generator; see :meth:`kd_lightning.gans.Generator.sample`."""
        return self.generator_ema.sample(labels, **kwargs)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Update the EMA of the generator: its parameters, and under ``ema_buffers: average`` its float buffers.

        Averaging the float buffers (BN statistics) is what BigGAN does with the whole state dict; other
        buffers are copied.
        """
        decay = self.hparams.ema_decay if int(self.g_steps) > self.hparams.ema_start else 0.0
        for pe, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            pe.lerp_(p.detach(), 1.0 - decay)
        average_buffers = self.hparams.get("ema_buffers", "average") == "average"
        for be, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            if average_buffers and be.is_floating_point():
                be.lerp_(b, 1.0 - decay)
            else:
                be.copy_(b)

    # ------------------------------------------------------------------ losses (subclasses)
    def discriminator_step_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"real": ..., "fake": ...}`` discriminator loss parts on this batch."""
        raise NotImplementedError

    def generator_step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.z_dim, device=self.device)

    def d_logits(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Discriminator on DiffAugmented images in [-1, 1]."""
        return self.discriminator(self.augment(x), y)

    # ------------------------------------------------------------------ the loop
    def _step(self, opt: LightningOptimizer | torch.optim.Optimizer, loss: torch.Tensor, net: nn.Module) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.gradient_clip_val is not None:
            # a LightningOptimizer is an instance of its optimiser's class (Lightning subclasses it on the fly)
            self.clip_gradients(
                cast(torch.optim.Optimizer, opt),
                gradient_clip_val=self.hparams.gradient_clip_val,
                gradient_clip_algorithm="norm",
            )
        opt.step()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt_g, opt_d = cast("list[LightningOptimizer]", self.optimizers())  # configure_optimizers returns two
        self.discriminator.train()
        with self.toggled_optimizer(opt_d):
            parts = self.discriminator_step_losses(batch)
            d_loss = parts["real"] + parts["fake"]
            self.log_dict({f"train/d/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=True)
            self.log("train/d_loss", d_loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
            self._step(opt_d, d_loss, self.discriminator)
        self.d_steps += 1
        if int(self.d_steps) % self.hparams.n_critic:
            return
        for _ in range(self.hparams.n_gen):
            with self.toggled_optimizer(opt_g):
                loss = self.generator_step_loss(batch)
                self.log("train/g_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
                self._step(opt_g, loss, self.generator)
            self.g_steps += 1
            self.update_ema()


__all__ = ["GANTask", "gan_adam"]
