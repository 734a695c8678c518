"""CcGAN (Ding et al., 2021): continuous labels in [0, 1], cGAN-KD's regression GAN, and its label-embedding stage.

:class:`CcGAN` trains with the vicinal losses HVDL/SVDL and the label inputs NLI/ILI; with ILI its label embedding
comes from a :class:`LabelEmbedding` checkpoint (:func:`kd_lightning.loading.load_label_embedding`).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from kd_lightning.data.base import dataset_labels
from kd_lightning.errors import ConfigError
from kd_lightning.gans import (
    EmbeddingRegressor,
    Generator,
    LabelToEmbedding,
    ResNetDiscriminator,
    ResNetGenerator,
    VicinalSampler,
    d_loss_parts,
    g_loss,
)
from kd_lightning.gans.losses import LossType, Vicinity
from kd_lightning.loading import load_label_embedding
from kd_lightning.methods.base import BaseTask
from kd_lightning.methods.gan.base import GANTask


class CcGAN(GANTask):
    """Continuous conditional GAN (Ding et al., 2021) on labels normalised to [0, 1].

    Each discriminator step follows the paper's Algorithm 1 as the official code (improved_CcGAN, and
    cGAN-KD's copy) runs it: ``y_j`` are drawn uniformly, with replacement, from the DISTINCT training labels
    (``target_draw: unique``; ``batch`` takes the batch's labels instead, i.e. weighted by frequency);
    targets are ``t_j = y_j + eps_j``; the real image at ``t_j`` is drawn from the training set among those
    with labels in the vicinity of ``t_j`` (so real images are fetched from the training dataset by index,
    and the batch only paces the steps); the fake one is generated at a label drawn uniformly in that
    vicinity; the HVDL/SVDL weights multiply the losses. The generator step draws its own ``y_j`` the same
    way and generates at ``y_j + eps_j``, unclamped as in the reference (``clamp_generator_targets`` clamps
    it to [0, 1]).

    Args:
        vicinity: ``"hard"`` (HVDL) or ``"soft"`` (SVDL).
        kernel_sigma: std of the label noise; ``None`` = rule of thumb ``1.06 std(y) N^(-1/5)``.
        kappa: HVDL half-width; ``None`` = ``kappa_multiplier`` x the largest gap between distinct labels.
        nu: SVDL sharpness; ``None`` = ``1 / (kappa_multiplier x that gap)^2``.
        kappa_multiplier: ``m_kappa`` of the rule of thumb.
        soft_threshold: SVDL's smallest weight kept (the official code's 1e-3).
        label_input: ``"nli"`` (naive: the label itself) or ``"ili"`` (improved: the label's
            embedding from a :class:`LabelEmbedding` stage).
        target_draw: ``unique`` (the official code) or ``batch`` (the batch's labels, by frequency).
        clamp_generator_targets: clamp the generator step's ``y_j + eps_j`` to [0, 1] (not in the reference).
        embedding_checkpoint: the :class:`LabelEmbedding` checkpoint for ILI (needed to start
            training; a CcGAN checkpoint already holds the embedding net).
        embed_dim: width of the ILI embedding (must match the embedding checkpoint).
        **kwargs: see :class:`GANTask` (default loss here: ``"vanilla"``, as the CcGAN code).
    """

    task = "regression"
    condition = "continuous"
    generator: ResNetGenerator  # continuous-label ResNet generator (see build_nets)
    generator_ema: ResNetGenerator

    def __init__(
        self,
        vicinity: Vicinity = "hard",
        kernel_sigma: float | None = None,
        kappa: float | None = None,
        nu: float | None = None,
        kappa_multiplier: float = 1.0,
        soft_threshold: float = 1e-3,
        label_input: Literal["nli", "ili"] = "nli",
        target_draw: Literal["unique", "batch"] = "unique",
        clamp_generator_targets: bool = False,
        embedding_checkpoint: str | None = None,
        embed_dim: int = 128,
        loss: LossType = "vanilla",
        **kwargs: Any,
    ) -> None:
        if vicinity not in ("hard", "soft"):
            raise ConfigError(f"vicinity={vicinity!r}; expected 'hard' (HVDL) or 'soft' (SVDL)")
        if label_input not in ("nli", "ili"):
            raise ConfigError(f"label_input={label_input!r}; expected 'nli' or 'ili'")
        if target_draw not in ("unique", "batch"):
            raise ConfigError(f"target_draw={target_draw!r}; expected 'unique' (official) or 'batch'")
        if kappa_multiplier <= 0:
            raise ConfigError(f"kappa_multiplier={kappa_multiplier}; expected a positive number")
        for name, value in (("kernel_sigma", kernel_sigma), ("kappa", kappa), ("nu", nu)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name}={value}; expected a positive number or null (rule of thumb)")
        super().__init__(loss=loss, **kwargs)
        self.vicinal: VicinalSampler | None = None
        self._real_dataset: Dataset | None = None

    def build_nets(self) -> tuple[Generator, nn.Module]:
        hp = self.hparams
        ili = hp.label_input == "ili"
        y2h = LabelToEmbedding(hp.embed_dim) if ili else None
        if y2h is not None and hp.embedding_checkpoint:
            y2h.load_state_dict(load_label_embedding(hp.embedding_checkpoint, hp.embed_dim))
        g = ResNetGenerator(
            hp.image_size, hp.in_channels, hp.z_dim, hp.g_ch, "continuous", label_embed=y2h, embed_dim=hp.embed_dim
        )
        d = ResNetDiscriminator(
            hp.image_size, hp.in_channels, hp.d_ch, "continuous", embed_dim=hp.embed_dim, label_is_embedding=ili
        )
        return g, d

    def on_train_start(self) -> None:
        """Read every training label (for the vicinities) and keep the dataset to fetch real images from."""
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_dataset", None)
        if ds is None:
            loader = self.trainer.train_dataloader
            ds = getattr(loader, "dataset", None)
        if ds is None:
            raise ConfigError("CcGAN needs the training dataset (a DataModule with train_dataset)")
        self._real_dataset = ds
        hp = self.hparams
        self.vicinal = VicinalSampler(
            dataset_labels(ds).float(),
            hp.vicinity,
            hp.kernel_sigma,
            hp.kappa,
            hp.nu,
            hp.kappa_multiplier,
            hp.soft_threshold,
        )
        v = self.vicinal
        self.print(
            f"CcGAN: sigma={v.sigma:.5g}, {'kappa' if hp.vicinity == 'hard' else 'nu'}="
            f"{v.kappa if hp.vicinity == 'hard' else v.nu:.5g}, window half-width={v.radius:.5g}"
        )

    def cond(self, y: torch.Tensor) -> torch.Tensor:
        """What the discriminator takes for labels ``y``: the labels (NLI) or their embeddings (ILI)."""
        y = y.float().to(self.device)
        if self.generator.uses_embedding:
            with torch.no_grad():
                return self.generator.label_embed(y)
        return y

    def real_images(self, idx: torch.Tensor) -> torch.Tensor:
        ds = self._real_dataset
        assert ds is not None, "on_train_start keeps the training dataset"
        return torch.stack([ds[int(i)]["image"] for i in idx]).to(self.device)

    def discriminator_step_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v = self.vicinal
        if v is None:
            raise RuntimeError("CcGAN.on_train_start has not run")
        t = v.targets(self.base_labels(batch))
        idx = v.real_indices(t)
        y_real, y_fake = v.labels[idx], v.fake_labels(t)
        w_real, w_fake = v.weights(y_real, t).to(self.device), v.weights(y_fake, t).to(self.device)
        real = self.real_images(idx) * 2 - 1
        with torch.no_grad():
            fake = self.generator(self.noise(len(t)), y_fake.float().to(self.device))
        c = self.cond(t)
        real_d, fake_d = d_loss_parts(self.d_logits(real, c), self.d_logits(fake, c), self.hparams.loss, w_real, w_fake)
        return {"real": real_d, "fake": fake_d}

    def base_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The y_j of a step: drawn from the distinct training labels (``unique``) or the batch's (``batch``)."""
        if self.hparams.target_draw == "batch":
            return batch["label"].detach().cpu().double()
        assert self.vicinal is not None
        return self.vicinal.draw_unique(len(batch["label"]))

    def generator_step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        v = self.vicinal
        assert v is not None
        y = self.base_labels(batch)
        t = y + v.sigma * torch.randn(len(y), dtype=torch.float64)
        if self.hparams.clamp_generator_targets:
            t = t.clamp(0.0, 1.0)
        t = t.float().to(self.device)
        return g_loss(self.d_logits(self.generator(self.noise(len(t)), t), self.cond(t)), self.hparams.loss)


class LabelEmbedding(BaseTask):
    """ILI stage of CcGAN: train the image -> embedding -> label net, then the label -> embedding map.

    Epochs ``[0, embed_epochs)`` train :class:`~kd_lightning.gans.EmbeddingRegressor` (MSE on the
    normalised label); the remaining epochs train :class:`~kd_lightning.gans.LabelToEmbedding` so
    that the frozen last layer ``h2y`` maps its output back to the label, with labels perturbed by
    N(0, ``label_noise``^2) and clamped to [0, 1] (the official code's 0.2). As in the official code, the
    second phase's labels are drawn uniformly from the DISTINCT training labels (``label_draw: unique``;
    ``batch`` uses the batch's labels, weighted by frequency). The CcGAN then loads ``y2h`` from this
    checkpoint (``embedding_checkpoint``).

    Args:
        net: registered backbone of the embedding regressor.
        embed_dim: embedding width.
        embed_epochs: epochs of the first phase (the rest of ``max_epochs`` trains ``y2h``).
        label_noise: std of the label perturbation in the second phase.
        label_draw: where the second phase's labels come from: ``unique`` (official) or ``batch``.
        **kwargs: see :class:`~kd_lightning.methods.base.BaseTask`.
    """

    task = "regression"
    monitor = None
    monitor_mode = "min"

    def __init__(
        self,
        net: str = "resnet8",
        embed_dim: int = 128,
        embed_epochs: int = 10,
        label_noise: float = 0.2,
        label_draw: Literal["unique", "batch"] = "unique",
        **kwargs: Any,
    ) -> None:
        if embed_epochs < 1:
            raise ConfigError(f"embed_epochs={embed_epochs}; expected a positive integer")
        if label_draw not in ("unique", "batch"):
            raise ConfigError(f"label_draw={label_draw!r}; expected 'unique' (official) or 'batch'")
        super().__init__(**kwargs)
        self._unique_labels: torch.Tensor | None = None

    def on_train_start(self) -> None:
        """The distinct training labels, for the second phase's draws."""
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_dataset", None)
        if ds is not None:
            self._unique_labels = torch.unique(dataset_labels(ds).float().flatten())

    def configure_models(self) -> None:
        hp = self.hparams
        self.embedder = EmbeddingRegressor(hp.net, hp.in_channels, hp.embed_dim)
        self.y2h = LabelToEmbedding(hp.embed_dim)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        y = batch["label"].float()
        if self.current_epoch < self.hparams.embed_epochs:
            loss = F.mse_loss(self.embedder(self.normalize(batch["image"])), y)
            self.log("train/embed_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            return loss
        if self.hparams.label_draw == "unique":
            if self._unique_labels is None:
                raise ConfigError("LabelEmbedding label_draw='unique' needs a DataModule with a train_dataset")
            y = self._unique_labels[torch.randint(len(self._unique_labels), (len(y),))].to(y.device)
        y = (y + self.hparams.label_noise * torch.randn_like(y)).clamp(0.0, 1.0)
        lin = cast(nn.Linear, self.embedder.h2y[0])  # h2y = Linear(dim, 1) + ReLU
        pred = F.relu(F.linear(self.y2h(y), lin.weight.detach(), lin.bias.detach())).squeeze(1)
        loss = F.mse_loss(pred, y)
        self.log("train/y2h_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss


__all__ = ["CcGAN", "LabelEmbedding"]
