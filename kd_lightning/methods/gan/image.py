"""Image GANs on class labels or none: :class:`ConditionalGAN` (cGAN-KD's classification GAN) and :class:`DCGAN`.

- :class:`ConditionalGAN` — SNGAN/BigGAN-style ResNets, shared class embedding, projection discriminator, hinge loss;
- :class:`DCGAN` — unconditional DCGAN/DAFL-style nets, latent dimension a parameter (for a MEKD-like
  deprivatisation, ``z_dim`` = classes; not the layout of MEKD's own DCGAN.py).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.gans import (
    DCGANDiscriminator,
    DCGANGenerator,
    Generator,
    ResNetDiscriminator,
    ResNetGenerator,
    d_loss_parts,
    g_loss,
)
from kd_lightning.gans.losses import LossType
from kd_lightning.methods.gan.base import GANTask


class ConditionalGAN(GANTask):
    """Class-conditional GAN (SNGAN/BigGAN-style ResNets, projection discriminator, hinge loss).

    Fake images in a discriminator or generator pass are drawn for the batch's own labels, so the
    fake class distribution follows the data's.

    Args:
        shared_dim: width of the generator's shared class embedding.
        **kwargs: see :class:`GANTask`.
    """

    task = "classification"

    def __init__(self, shared_dim: int = 128, **kwargs: Any) -> None:
        if shared_dim < 1:
            raise ConfigError(f"shared_dim={shared_dim}; expected a positive integer")
        super().__init__(**kwargs)

    def build_nets(self) -> tuple[Generator, nn.Module]:
        hp = self.hparams
        if hp.num_classes is None:
            raise ConfigError("ConditionalGAN needs num_classes (kdl links it from the DataModule)")
        g = ResNetGenerator(hp.image_size, hp.in_channels, hp.z_dim, hp.g_ch, "class", hp.num_classes, hp.shared_dim)
        d = ResNetDiscriminator(hp.image_size, hp.in_channels, hp.d_ch, "class", hp.num_classes)
        return g, d

    def discriminator_step_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        real, y = batch["image"] * 2 - 1, batch["label"]
        with torch.no_grad():
            fake = self.generator(self.noise(len(y)), y)
        real_d, fake_d = d_loss_parts(self.d_logits(real, y), self.d_logits(fake, y), self.hparams.loss)
        return {"real": real_d, "fake": fake_d}

    def generator_step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y = batch["label"]
        return g_loss(self.d_logits(self.generator(self.noise(len(y)), y), y), self.hparams.loss)


class DCGAN(GANTask):
    """Unconditional DCGAN with DCGAN/DAFL-style nets; labels are ignored.

    ``z_dim`` is the latent dimension (e.g. the number of classes, as MEKD's deprivatisation sets it; MEKD's
    own DCGAN.py layout differs).

    Args:
        **kwargs: see :class:`GANTask` (defaults here: non-saturating loss, Adam betas (0.5, 0.999)
            in the recipes).
    """

    task = "any"
    condition = "none"

    def __init__(self, z_dim: int = 100, loss: LossType = "vanilla", **kwargs: Any) -> None:
        super().__init__(z_dim=z_dim, loss=loss, **kwargs)

    def build_nets(self) -> tuple[Generator, nn.Module]:
        hp = self.hparams
        return DCGANGenerator(hp.z_dim, hp.image_size, hp.in_channels, hp.g_ch), DCGANDiscriminator(
            hp.image_size, hp.in_channels, hp.d_ch
        )

    def check_data(self, dm: L.LightningDataModule) -> None:
        """Any dataset with the right channels and size (labels are not used)."""
        theirs = getattr(dm, "in_channels", None)
        if theirs is not None and theirs != self.hparams.in_channels:
            raise ConfigError(f"model has in_channels={self.hparams.in_channels} but {type(dm).__name__} has {theirs}")
        size = getattr(dm, "image_size", None)
        if size is not None and size != self.hparams.image_size:
            raise ConfigError(f"model has image_size={self.hparams.image_size} but {type(dm).__name__} has {size}")

    def discriminator_step_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        real = batch["image"] * 2 - 1
        with torch.no_grad():
            fake = self.generator(self.noise(len(real)))
        real_d, fake_d = d_loss_parts(self.d_logits(real, None), self.d_logits(fake, None), self.hparams.loss)
        return {"real": real_d, "fake": fake_d}

    def generator_step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return g_loss(self.d_logits(self.generator(self.noise(len(batch["image"]))), None), self.hparams.loss)


__all__ = ["DCGAN", "ConditionalGAN"]
