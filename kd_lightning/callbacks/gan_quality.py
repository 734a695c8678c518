"""Sample grids and sample-quality metrics of a GAN at an interval during training (and at its end).

Every ``every_n_steps`` global steps (D and G updates both count) and when training ends, the EMA
generator (or the raw one, ``use_ema=False``) draws a fixed set of latent codes (``seed``), so grids
of successive evaluations show the same codes: a PNG grid (one row per class, or per label value
for a CcGAN) is written under ``dirpath`` and, when a :class:`~lightning.pytorch.loggers.WandbLogger`
is attached, logged to W&B.
With a ``teacher`` checkpoint (a classifier for class-conditional GANs and DCGANs, a regressor for a
CcGAN) it also logs, in the teacher's penultimate feature space (no downloads):

- ``quality/fid``: FID between generated images and real validation images;
- ``quality/intra_fid``: mean per-class FID (class-conditional);
- ``quality/label_consistency``: share of generated images the teacher assigns to their label;
- ``quality/label_mae``: CcGAN, mean |assigned - predicted| label in original units.

The evaluation draws no numbers from the global RNGs, so it does not change the training run.
"""

from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from kd_lightning.errors import ConfigError
from kd_lightning.fileio import atomic_write_bytes
from kd_lightning.gans import labels_per_class
from kd_lightning.metrics.gan import (
    TeacherFeatures,
    fid_from_features,
    intra_fid,
    label_consistency,
    per_class_take,
)
from kd_lightning.wandb_media import log_image

if TYPE_CHECKING:
    from kd_lightning.methods.gan import GANTask


def save_grid_png(images: torch.Tensor, path: str, nrow: int, min_side: int = 32) -> None:
    """Images in [0, 1] -> one PNG grid, written atomically.

    Images smaller than ``min_side`` pixels are enlarged by a whole factor (nearest neighbour, every pixel a block),
    so a grid of 8 px digits is not a thumbnail.
    """
    side = int(images.shape[-1])
    if 0 < side < min_side:
        factor = -(-min_side // side)
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    buf = io.BytesIO()
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


class GANQuality(L.Callback):
    """Sample grids and FID / Intra-FID / label consistency (or label MAE) at an interval.

    Args:
        teacher: checkpoint of a kdl classifier/regressor trained on the same data (features and
            labels); ``None`` writes grids only.
        every_n_steps: evaluate every this many global steps (and at the end of training).
        n_per_class: generated and real images per class (per label value for a CcGAN; a DCGAN
            draws ``n_per_class * 10``) for the metrics.
        n_label_values: CcGAN: evaluated label values, evenly spaced in [0, 1].
        grid_per_class: images per grid row.
        teacher_image_size: the side the teacher takes (default: its checkpoint's ``image_size``).
        seed: seed of the latent codes (the same codes at every evaluation).
        use_ema: evaluate the EMA generator (what sampling uses); ``False`` evaluates the raw one.
        dirpath: where the grids and metric files go (default ``<default_root_dir>/samples``).
    """

    def __init__(
        self,
        teacher: str | None = None,
        every_n_steps: int = 1000,
        n_per_class: int = 100,
        n_label_values: int = 10,
        grid_per_class: int = 10,
        teacher_image_size: int | None = None,
        seed: int = 0,
        use_ema: bool = True,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("n_per_class", n_per_class),
            ("n_label_values", n_label_values),
            ("grid_per_class", grid_per_class),
        ):
            if value < 1:
                raise ConfigError(f"GANQuality {name}={value}; expected a positive integer")
        if teacher is not None and not os.path.isfile(teacher):
            raise ConfigError(f"GANQuality teacher={teacher!r}: no such checkpoint file")
        self.teacher_path, self.every_n_steps, self.n_per_class = teacher, every_n_steps, n_per_class
        self.n_label_values, self.grid_per_class, self.seed = n_label_values, grid_per_class, seed
        self.teacher_image_size, self.dirpath, self.use_ema = teacher_image_size, dirpath, use_ema
        self._features: TeacherFeatures | None = None
        self._real: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # features, labels, outputs
        self._last_step = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step // self.every_n_steps > self._last_step // self.every_n_steps and step > 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def _folder(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "samples")

    def _teacher(self, pl_module: L.LightningModule) -> TeacherFeatures | None:
        if self.teacher_path is None:
            return None
        if self._features is None:
            from kd_lightning.checkpoints import load_checkpoint
            from kd_lightning.teachers.frozen import FrozenTeacher

            teacher = FrozenTeacher.from_checkpoint(self.teacher_path)
            size = self.teacher_image_size or int(load_checkpoint(self.teacher_path)["hyper_parameters"]["image_size"])
            self._features = TeacherFeatures(teacher.to(pl_module.device), size)
        return self._features

    def _labels(self, pl_module: GANTask, n: int) -> torch.Tensor | int:
        condition = pl_module.generator.condition
        if condition == "class":
            return labels_per_class(n, int(pl_module.hparams.num_classes))
        if condition == "continuous":
            return torch.linspace(0, 1, self.n_label_values).repeat_interleave(n)
        return n * 10

    def _real_reference(
        self, trainer: L.Trainer, pl_module: GANTask, feats: TeacherFeatures
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._real is None:
            dm = getattr(trainer, "datamodule", None)
            ds = getattr(dm, "val_dataset", None) if dm is not None else None
            if ds is None or len(ds) == 0:
                raise ConfigError("GANQuality needs real validation images (a DataModule with val_fraction > 0)")
            items = [ds[i] for i in range(len(ds))]
            images = torch.stack([it["image"] for it in items])
            labels = torch.stack([torch.as_tensor(it["label"]) for it in items])
            if pl_module.generator.condition == "class":
                images, labels = per_class_take(images, labels, self.n_per_class)
            else:
                n = self.n_per_class * (self.n_label_values if pl_module.generator.condition == "continuous" else 10)
                images, labels = images[:n], labels[:n]
            f, out = feats.batched(images)
            self._real = (f, labels, out)
        return self._real

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Write the grid and compute the metrics now; returns the metrics.

        Building the teacher draws initial weights from the global RNG: the CPU RNG state is put back
        afterwards, so a run with this callback trains exactly as one without it.
        """
        from kd_lightning.loading import is_gan

        if not is_gan(pl_module):
            raise ConfigError(f"GANQuality evaluates GANs; {type(pl_module).__name__} is not a GANTask")
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: L.Trainer, pl_module: GANTask) -> dict[str, Any]:
        self._last_step = trainer.global_step
        gen = pl_module.sampler_generator(ema=self.use_ema)
        folder = self._folder(trainer)
        grid = gen.sample(self._labels(pl_module, self.grid_per_class), seed=self.seed)
        rows = self.grid_per_class if gen.condition != "none" else 10
        png = os.path.join(folder, f"step{trainer.global_step:07d}.png")
        if trainer.is_global_zero:
            save_grid_png(grid, png, nrow=rows)
            save_grid_png(grid, os.path.join(folder, "latest.png"), nrow=rows)
        metrics: dict[str, Any] = {}
        feats = self._teacher(pl_module)
        if feats is not None:
            labels = self._labels(pl_module, self.n_per_class)
            fake = gen.sample(labels, seed=self.seed + 1)
            f_fake, out_fake = feats.batched(fake)
            f_real, y_real, _ = self._real_reference(trainer, pl_module, feats)
            metrics["quality/fid"] = fid_from_features(f_real, f_fake)
            if gen.condition == "class":
                assert isinstance(labels, torch.Tensor)  # class ids (a count only without a condition)
                metrics["quality/intra_fid"], _ = intra_fid(f_real, y_real, f_fake, labels)
                metrics["quality/label_consistency"] = label_consistency(out_fake, labels)
            elif gen.condition == "continuous":
                lo, hi = pl_module.hparams.label_range or (0.0, 1.0)
                pred = out_fake.view(-1)
                metrics["quality/label_mae"] = float(((pred - labels) * (hi - lo)).abs().mean())
        self.history.append({"step": trainer.global_step, **metrics})
        if trainer.is_global_zero:
            # the step Lightning's own logging uses (batches; manual optimisation's global_step counts D and G)
            log_step = int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
            for logger in trainer.loggers:
                if metrics:
                    logger.log_metrics(metrics, step=log_step)
            log_image(trainer, "samples", png, step=log_step)
            atomic_write_bytes(os.path.join(folder, "quality.json"), json.dumps(self.history, indent=1).encode())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = int(state_dict.get("last_step", 0))
