"""GANs as LightningModules with manual optimisation: class-conditional, continuous (CcGAN), DCGAN.

One template (:class:`GANTask`) runs the adversarial loop inside Lightning's Trainer: each training
step is one discriminator update on the batch; every ``n_critic``-th step is followed by ``n_gen``
generator updates (so ``global_step`` counts D and G updates alike). Both optimisers are injected
(``generator_optimizer``/``discriminator_optimizer``), DiffAugment is applied to real and fake images
in every discriminator pass when ``diffaugment`` is set, gradients are clipped with
``self.clip_gradients`` when ``gradient_clip_val`` is set, and an exponential moving average of the
generator (``generator_ema``) is kept for sampling. Everything (both nets, the EMA copy, both
optimiser states, the step counter) is in the checkpoint, so ``--ckpt_path last`` resumes exactly.
The named loss parts are logged before every backward pass (``train/d/real``, ``train/d/fake``,
``train/g_loss``) so the NaN guard can name the one that broke.

Three subclasses choose the nets and the losses:

- :class:`ConditionalGAN` — SNGAN/BigGAN-style ResNets, shared class embedding, projection
  discriminator, hinge loss (cGAN-KD's classification GAN);
- :class:`CcGAN` — continuous labels in [0, 1] with HVDL/SVDL and NLI/ILI (cGAN-KD's regression GAN);
- :class:`DCGAN` — unconditional DCGAN/DAFL-style nets, latent dimension a parameter (for a MEKD-like
  deprivatisation, ``z_dim`` = classes; not the layout of MEKD's own DCGAN.py).

Images are in [0, 1] in batches and in :meth:`Generator.sample`; the nets work in [-1, 1].
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn
from torch.utils.data import Dataset

from kd_lightning.data.base import dataset_labels
from kd_lightning.errors import ConfigError
from kd_lightning.gans import (
    DCGANDiscriminator,
    DCGANGenerator,
    DiffAugment,
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
from kd_lightning.loading import load_gan, load_label_embedding  # re-exported: their old home
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


__all__ = [
    "DCGAN",
    "CcGAN",
    "ConditionalGAN",
    "GANTask",
    "LabelEmbedding",
    "gan_adam",
    "load_gan",
]
