"""Conditional density-ratio estimation in feature space (cDRE-F-cSP, Ding et al. 2022) for cDR-RS.

r(x|y) = p_r(x|y) / p_g(x|y) is modelled by an MLP on the features h = phi(x) of a fixed, pre-trained
encoder (by default the teacher's penultimate features; any kdl classifier or regressor checkpoint
works, e.g. one trained for this purpose), conditioned on the label: a learned embedding of width C
for C classes (the official code's ``nn.Embedding(C, C)``), or the normalised scalar for regression.
The output goes through a ReLU, so r >= 0.

The loss is the Softplus Bregman divergence of the official code plus its penalty:

    L = E_g[sigmoid(r) r] - E_g[softplus(r)] - E_r[sigmoid(r)] + lambda (E_g[r] - 1)^2

whose minimiser over r(x) is p_r(x)/p_g(x) pointwise (d/dr of the integrand is sigmoid'(r)(p_g r - p_r)).
Fake images are drawn fresh from the frozen generator at every step, for the batch's own labels
(regression: labels drawn uniformly in [y - kappa, y + kappa], the ratio taken at y, as the official
code does; with an encoder that predicts labels, fakes whose prediction falls outside that window
are dropped together with their real partners). Real features can be cached by sample index.

:class:`DensityRatioModel` is the plain ``nn.Module`` used at sampling time; the Lightning checkpoint
carries it whole (``checkpoint["density_ratio_model"]``), so :func:`load_density_ratio` needs no other
file. Both live in :mod:`kd_lightning.sampling.density_ratio` (below methods/, which only trains them) and are
re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch.optim.optimizer import ParamsT

from kd_lightning.data.base import augments
from kd_lightning.errors import ConfigError
from kd_lightning.gans import Generator
from kd_lightning.methods.base import BaseTask
from kd_lightning.sampling.density_ratio import DensityRatioModel, RatioHead, load_density_ratio
from kd_lightning.teachers import FrozenTeacher

#: the official code's MLP widths
MLP_WIDTHS = {
    "MLP3": [512, 256, 128],
    "MLP5": [2048, 1024, 512, 256, 128],
}


def dr_adam(params: ParamsT) -> torch.optim.Optimizer:
    """Adam, lr 1e-4, betas (0.5, 0.999), weight decay 1e-4 (cDR-RS's DR optimiser)."""
    return torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.999), weight_decay=1e-4)


def sp_loss(ratio_real: torch.Tensor, ratio_fake: torch.Tensor, penalty: float) -> torch.Tensor:
    """cDR-RS's Softplus divergence loss plus ``penalty * (mean r(fake) - 1)^2``."""
    div = (
        (torch.sigmoid(ratio_fake) * ratio_fake).mean()
        - F.softplus(ratio_fake).mean()
        - torch.sigmoid(ratio_real).mean()
    )
    return div + penalty * (ratio_fake.mean() - 1) ** 2


class DensityRatioEstimator(BaseTask):
    """cDRE-F-cSP: fit r(x|y) = p_r(x|y) / p_g(x|y) on real batches and fresh generator samples.

    Args:
        generator: checkpoint of the trained GAN (ConditionalGAN or CcGAN); its EMA generator is used
            unless ``ema`` is false.
        encoder: checkpoint of a kdl classifier/regressor whose features the ratio is fitted on
            (the teacher by default in the recipes).
        encoder_layer: which features (``penultimate``, ``stage{i}``, a module path).
        encoder_image_size: the side the encoder takes (default: its checkpoint's ``image_size``).
        mlp: ``"MLP3"``/``"MLP5"`` (the official widths) or an explicit list of widths.
        dropout: dropout in the MLP (the official 0.5).
        penalty: lambda of ``lambda (mean r(fake) - 1)^2`` (default 1e-3; the shipped official scripts use 0.01).
        kappa: regression: half-width of the label vicinity the fake labels are drawn from (0: y itself).
        vicinity_check: regression with kappa > 0 and an encoder that predicts labels: drop fakes whose
            predicted label lies outside the vicinity (official code).
        ema: sample from the generator's EMA copy.
        cache_real_features: keep the real images' features by sample index (needs un-augmented data).
        optimizer: the MLP's optimiser (default Adam lr 1e-4, betas (0.5, 0.999), weight decay 1e-4).
        **kwargs: see :class:`~kd_lightning.methods.base.BaseTask` (data facts are linked by kdl).
    """

    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        generator: str,
        encoder: str,
        encoder_layer: str = "penultimate",
        encoder_image_size: int | None = None,
        mlp: str | list[int] = "MLP5",
        dropout: float = 0.5,
        penalty: float = 1e-3,
        kappa: float = 0.0,
        vicinity_check: bool = True,
        ema: bool = True,
        cache_real_features: bool = True,
        optimizer: OptimizerCallable = dr_adam,
        **kwargs: Any,
    ) -> None:
        if isinstance(mlp, str) and mlp not in MLP_WIDTHS:
            raise ConfigError(f"mlp={mlp!r}; expected one of {sorted(MLP_WIDTHS)} or a list of widths")
        if not isinstance(mlp, str) and any(int(w) < 1 for w in mlp):
            raise ConfigError(f"mlp={mlp!r}; expected positive widths ([] = a linear model)")
        if penalty < 0:
            raise ConfigError(f"penalty={penalty}; expected a value >= 0")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout}; expected a value in [0, 1)")
        if kappa < 0:
            raise ConfigError(f"kappa={kappa}; expected a value >= 0")
        from kd_lightning.loading import load_gan

        gan = load_gan(generator)
        # plain attributes until nn.Module.__init__ has run; configure_models registers the encoder
        from kd_lightning.sampling.store import sha256_file

        self._pending = (
            FrozenTeacher.from_checkpoint(encoder),
            int(encoder_image_size or _checkpoint_image_size(encoder)),
            sha256_file(encoder),
        )
        self._gen_holder = [gan.sampler_generator(ema).requires_grad_(False).eval()]  # not a submodule: not saved
        self.task = "classification" if self._gen_holder[0].condition == "class" else "regression"
        if self._gen_holder[0].condition == "none":
            raise ConfigError(f"generator {generator!r} is unconditional; cDR-RS needs a conditional GAN")
        super().__init__(optimizer=optimizer, **kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        widths = MLP_WIDTHS[hp.mlp] if isinstance(hp.mlp, str) else [int(w) for w in hp.mlp]
        if self.task == "classification" and hp.num_classes is None:
            raise ConfigError("DensityRatioEstimator needs num_classes (kdl links it from the DataModule)")
        encoder, size, encoder_sha256 = self._pending
        del self._pending
        self.model = DensityRatioModel(encoder, self.task, hp.num_classes, widths, hp.dropout, size, hp.encoder_layer)
        self.model.encoder_sha256 = encoder_sha256
        self._real_cache: torch.Tensor | None = None
        self._cached = torch.zeros(0, dtype=torch.bool)

    @property
    def generator(self) -> Generator:
        g = self._gen_holder[0]
        if next(g.parameters()).device != self.device:
            g.to(self.device)
        return g.eval()

    def trainable_parameters(self) -> Iterable[torch.Tensor]:
        return (p for p in self.model.head.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ data
    def check_data(self, dm: L.LightningDataModule) -> None:
        super().check_data(dm)
        if self.hparams.cache_real_features and augments(dm):
            raise ConfigError(
                f"cache_real_features=true keeps each real image's features, but {type(dm).__name__} augments "
                "(augment=true); set data.init_args.augment false or cache_real_features false"
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and stage == "fit" and self.hparams.cache_real_features:
            from kd_lightning.data.utils import num_indices

            self._cached = torch.zeros(num_indices(dm), dtype=torch.bool)
            self._real_cache = None

    def real_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.hparams.cache_real_features or len(self._cached) == 0:
            return self.model.features(batch["image"])[0]
        idx = batch["index"].long().cpu()
        new = ~self._cached[idx]
        if bool(new.any()):
            feats = self.model.features(batch["image"][new.to(batch["image"].device)])[0]
            if self._real_cache is None:
                self._real_cache = feats.new_zeros((len(self._cached), feats.shape[1]))
            self._real_cache[idx[new].to(feats.device)] = feats
            self._cached[idx[new]] = True
        cache = self._real_cache
        assert cache is not None, "an index is marked cached only once the cache exists"
        return cache[idx.to(cache.device)]

    # ------------------------------------------------------------------ fakes
    @torch.no_grad()
    def fake_batch(self, y: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake features, keep mask) for labels ``y``; the fake is conditioned near y (regression) or on y."""
        g = self.generator
        z = torch.randn(len(y), g.z_dim, generator=gen).to(self.device)
        if self.task == "classification":
            images = ((g(z, y.long()) + 1) / 2).clamp(0, 1)
            return self.model.features(images)[0], torch.ones(len(y), dtype=torch.bool, device=self.device)
        kappa = self.hparams.kappa
        y = y.float()
        u = torch.rand(len(y), generator=gen).to(self.device)
        y_fake = (y - kappa + 2 * kappa * u).clamp(0, 1) if kappa > 0 else y
        images = ((g(z, y_fake) + 1) / 2).clamp(0, 1)
        h, out = self.model.features(images)
        keep = torch.ones(len(y), dtype=torch.bool, device=self.device)
        if kappa > 0 and self.hparams.vicinity_check and self.model.encoder.task == "regression":
            pred = out.flatten()
            keep = (pred >= y - kappa) & (pred <= y + kappa)
            if not bool(keep.any()):
                keep = torch.ones_like(keep)  # never an empty batch
        return h, keep

    def step_losses(
        self, batch: dict[str, torch.Tensor], real_h: torch.Tensor, gen: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        y = batch["label"]
        fake_h, keep = self.fake_batch(y, gen)
        y_kept = y[keep]
        r_real = self.model.ratio_from_features(real_h[keep], y_kept)
        r_fake = self.model.ratio_from_features(fake_h[keep], y_kept)
        loss = sp_loss(r_real, r_fake, self.hparams.penalty)
        return {"loss": loss, "ratio_real": r_real.mean().detach(), "ratio_fake": r_fake.mean().detach()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        parts = self.step_losses(batch, self.real_features(batch))
        self.log("train/loss", parts["loss"], on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({f"train/{k}": parts[k] for k in ("ratio_real", "ratio_fake")}, on_step=False, on_epoch=True)
        return parts["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        gen = torch.Generator().manual_seed(10_000 + batch_idx)  # the same fakes at every validation
        parts = self.step_losses(batch, self.model.features(batch["image"])[0], gen)
        self.log_dict({f"val/{k}": v for k, v in parts.items()}, on_step=False, on_epoch=True, prog_bar=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["density_ratio_model"] = {"spec": self.model.spec(), "state_dict": self.model.state_dict()}


def _checkpoint_image_size(path: str | os.PathLike) -> int:
    from kd_lightning.checkpoints import load_checkpoint

    return int(load_checkpoint(path).get("hyper_parameters", {}).get("image_size") or 32)


__all__ = ["DensityRatioEstimator", "DensityRatioModel", "RatioHead", "dr_adam", "load_density_ratio", "sp_loss"]
