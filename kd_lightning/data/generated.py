"""DataModules over generated samples: raw from a generator, a processed store, and real ∪ store (cGAN-KD's M3).

- :class:`GeneratedDataModule`: samples drawn straight from a GAN checkpoint (no store, no processing).
- :class:`FilteredDataModule`: the samples of a store (``kdl generate``), with the processing chosen:
  accepted by cDR-RS (the store's own setting), kept by the filter or not, replaced labels or not.
- :class:`AugmentedDataModule`: any real DataModule plus a store: ``D^r ∪ D^g_rho``, either
  concatenated or with a set share of fake images in every batch.

The training split is the only one with fake images: validation, test and predict come from the
real DataModule when one is given (else there are none). Fake images get the real DataModule's
training transforms (padding, augmentation), so real and fake batches match. ``index`` stays unique:
fake samples are numbered after the real training set's index range (``num_train_indices``), so the
teacher cache, CRD's memory banks and self-KD's stores keep working on the union.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS
from torch.utils.data import ConcatDataset, Dataset

from kd_lightning.data.base import ImageDataModule, dataset_len
from kd_lightning.data.fake_samples import FakeDataset, balanced_prefix, store_labels, store_samples
from kd_lightning.data.sampler import ShareSampler
from kd_lightning.errors import ConfigError
from kd_lightning.wandb_media import log_image

DATASET_FACTS = ("num_classes", "in_channels", "native_size", "mean", "std", "task", "label_range", "hflip")
"""What a DataModule over generated samples takes from the real DataModule beside it (its images must match)."""


class FakeTrainDataModule(ImageDataModule):
    """Base of the DataModules over generated samples: a training split of its own, the real one's other splits.

    With a real ``datamodule``, the dataset facts (:data:`DATASET_FACTS`) are its, and so are the loader
    settings (batch size, image size, augmentation, workers, seed) that ``kwargs`` leaves out; validation,
    test and predict are its splits. Without one there is no validation (an empty list) and no test split.
    A subclass builds the training set: it returns ``(uint8 images, labels)`` from :meth:`_fakes`, or
    overrides :meth:`build_train_dataset`.
    """

    def __init__(self, datamodule: ImageDataModule | None = None, **kwargs: Any) -> None:
        self.real = datamodule
        if datamodule is not None:
            for key in ("batch_size", "image_size", "augment", "num_workers", "seed"):
                kwargs.setdefault(key, getattr(datamodule, key))
            for key in DATASET_FACTS:
                setattr(self, key, getattr(datamodule, key))
        super().__init__(**kwargs)

    def _fakes(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_train_dataset(self) -> Dataset:
        """The training set, built once by ``setup("fit")``: the generated samples through the training transform."""
        images, labels = self._fakes()
        self._check_images(images)
        return FakeDataset(images, store_labels(labels, self.task), self.train_transform())

    def setup(self, stage: str | None = None) -> None:
        if self.real is not None:
            self.real.setup(stage)
            self.val_dataset, self.test_dataset = self.real.val_dataset, self.real.test_dataset
            self.predict_dataset = self.real.predict_dataset
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = self.build_train_dataset()

    def _check_images(self, images: torch.Tensor) -> None:
        if self.real is None:  # no real data to match: the images decide
            self.in_channels = int(images.shape[1])
        if images.shape[1] != self.in_channels:
            raise ConfigError(f"generated images have {images.shape[1]} channels but the data has {self.in_channels}")
        self.native_size = int(images.shape[-1])

    def _real_eval(self) -> ImageDataModule:
        if self.real is None:
            raise ConfigError(f"{type(self).__name__} has no test split without a real datamodule")
        return self.real

    def val_dataloader(self) -> EVAL_DATALOADERS:
        return self.real.val_dataloader() if self.real is not None else []

    def test_dataloader(self) -> EVAL_DATALOADERS:
        return self._real_eval().test_dataloader()

    def predict_dataloader(self) -> EVAL_DATALOADERS:
        return self._real_eval().predict_dataloader()


class GeneratedDataModule(FakeTrainDataModule):
    """Raw samples straight from a generator checkpoint: ``per_class`` per class, or ``per_value`` per label value.

    Args:
        generator: GAN checkpoint (ConditionalGAN or CcGAN).
        datamodule: the real DataModule whose validation/test splits (and dataset facts) are used.
        per_class: images per class (class-conditional GAN).
        label_values: CcGAN: normalised label values (default: ``n_label_values`` evenly spaced).
        n_label_values: CcGAN: size of the evenly spaced grid.
        per_value: CcGAN: images per label value.
        sample_seed: seed of the latent codes.
        ema: sample from the EMA generator.
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule` (default: the real DataModule's).
    """

    def __init__(
        self,
        generator: str,
        datamodule: ImageDataModule | None = None,
        per_class: int | None = None,
        label_values: list[float] | None = None,
        n_label_values: int = 10,
        per_value: int | None = None,
        sample_seed: int = 0,
        ema: bool = True,
        **kwargs: Any,
    ) -> None:
        from kd_lightning.loading import load_gan

        gan = load_gan(generator)
        self.gen = gan.sampler_generator(ema)
        self.generator_path, self.per_class, self.per_value = generator, per_class, per_value
        self.label_values, self.n_label_values, self.sample_seed = label_values, n_label_values, sample_seed
        if datamodule is None:
            hp = gan.hparams
            self.num_classes, self.in_channels, self.native_size = hp.num_classes, hp.in_channels, hp.image_size
            self.mean, self.std = tuple(hp.mean or (0.5,)), tuple(hp.std or (0.5,))
            self.task = "classification" if self.gen.condition == "class" else "regression"
            self.label_range = hp.get("label_range")
        super().__init__(datamodule, **kwargs)

    def _fakes(self) -> tuple[torch.Tensor, torch.Tensor]:
        from kd_lightning.gans import labels_per_class

        if self.gen.condition == "class":
            if self.per_class is None:
                raise ConfigError("GeneratedDataModule with a class-conditional GAN needs per_class")
            num_classes = self.gen.num_classes
            assert num_classes is not None  # a class-conditional generator has classes
            labels = labels_per_class(self.per_class, int(num_classes))
        else:
            if self.per_value is None:
                raise ConfigError(
                    "GeneratedDataModule with a CcGAN needs per_value (and label_values or n_label_values)"
                )
            values = torch.tensor(self.label_values) if self.label_values else torch.linspace(0, 1, self.n_label_values)
            labels = values.float().repeat_interleave(self.per_value)
        images = self.gen.sample(labels, seed=self.sample_seed)
        return (images * 255).round().clamp(0, 255).to(torch.uint8), labels


class FilteredDataModule(FakeTrainDataModule):
    """The samples of a finished store with the processing chosen.

    Args:
        store: the store folder written by ``kdl generate``.
        datamodule: the real DataModule whose validation/test splits (and dataset facts) are used.
        filtered: only the samples the teacher filter kept (else every accepted sample).
        replaced: the final labels (the teacher's where replacement ran) instead of the assigned ones.
        subsampled: check the store's cDR-RS setting (``None``: accept either).
        relabel: every sample gets the filtering teacher's label (see :func:`store_samples`).
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    def __init__(
        self,
        store: str,
        datamodule: ImageDataModule | None = None,
        filtered: bool = True,
        replaced: bool = True,
        subsampled: bool | None = None,
        relabel: bool = False,
        **kwargs: Any,
    ) -> None:
        self.store_path, self.filtered, self.replaced, self.subsampled = store, filtered, replaced, subsampled
        self.relabel = relabel
        super().__init__(datamodule, **kwargs)

    def _fakes(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, _, _ = store_samples(
            self.store_path, self.filtered, self.replaced, self.subsampled, relabel=self.relabel
        )
        return images, labels


class AugmentedDataModule(FakeTrainDataModule):
    """``D^r ∪ D^g_rho``: a real DataModule's training set plus a store's samples (cGAN-KD's M3).

    Args:
        datamodule: the real DataModule (its splits, transforms, batch size and facts are used).
        store: the store folder written by ``kdl generate``.
        filtered: use only the samples the filter kept.
        replaced: use the final (possibly replaced) labels.
        fake_share: ``None`` concatenates the two sets (an epoch = every real and fake sample once);
            a number in (0, 1) puts ``round(share x batch_size)`` fake images in every batch, an epoch
            being one pass over the real images (fakes are drawn without replacement, cycling).
        max_fake: use at most this many fake samples (the first ones of a seeded shuffle).
        fake_ratio: use ``round(fake_ratio x n_real)`` fake samples (M^g as a multiple of the real training
            set: 0 = none, the real-only control; 0.5, 1, 2, 4 = the M^g curve), a seeded subset with the
            store's class proportions; more than the store holds is refused. ``None`` = every sample.
        relabel: every fake sample gets the filtering teacher's label (the official classification scripts'
            ``adjust_True`` store); ``False`` keeps the store's labels (the paper: assigned labels for
            classification, the teacher's only where the store replaced them, i.e. regression).

    Fake images pass through the real DataModule's training transform: with ``augment`` on, the
    same random crop (and flip, where the dataset allows it) as the real images, as the official
    students train.
    """

    real: ImageDataModule  # always given here

    def __init__(
        self,
        datamodule: ImageDataModule,
        store: str,
        filtered: bool = True,
        replaced: bool = True,
        fake_share: float | None = None,
        max_fake: int | None = None,
        fake_ratio: float | None = None,
        relabel: bool = False,
    ) -> None:
        if fake_share is not None and not 0.0 < fake_share < 1.0:
            raise ConfigError(f"fake_share={fake_share}; expected a number in (0, 1) or null (concatenation)")
        if fake_ratio is not None and fake_ratio < 0:
            raise ConfigError(f"fake_ratio={fake_ratio}; expected a number >= 0 (a multiple of the real set) or null")
        if fake_ratio is not None and max_fake is not None:
            raise ConfigError("give fake_ratio or max_fake, not both")
        super().__init__(
            datamodule,
            root=datamodule.root,
            eval_batch_size=datamodule.eval_batch_size,
            val_fraction=datamodule.val_fraction,
            train_size=datamodule.train_size,
            resize_mode=datamodule.resize_mode,
        )
        self.store_path, self.filtered, self.replaced = store, filtered, replaced
        self.fake_share, self.max_fake = fake_share, max_fake
        self.fake_ratio, self.relabel = fake_ratio, relabel
        self.num_train_indices: int | None = None
        self.n_real = self.n_fake = 0
        self._store_rows: np.ndarray | None = None
        self._store = None

    def build_train_dataset(self) -> Dataset:
        """The real training set followed by the store's samples (indices after the real index range)."""
        from kd_lightning.data.utils import num_indices

        real_train = self.real.train_dataset
        if real_train is None:
            raise RuntimeError(f"{type(self.real).__name__}.setup('fit') built no training set")
        offset = num_indices(self.real)
        images, labels, rows, store = store_samples(self.store_path, self.filtered, self.replaced, relabel=self.relabel)
        if self.fake_ratio is not None:
            want = round(self.fake_ratio * dataset_len(real_train))
            if want > len(images):
                raise ConfigError(
                    f"fake_ratio={self.fake_ratio} asks for {want} fake samples ({self.fake_ratio} x "
                    f"{dataset_len(real_train)} real) but the store {self.store_path!r} gives {len(images)}; "
                    "write a larger store"
                )
            pick = balanced_prefix(labels, want, self.seed, self.task == "classification")
            images, labels, rows = images[pick], labels[pick], rows[pick.numpy()]
        elif self.max_fake is not None and self.max_fake < len(images):
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))[: self.max_fake]
            pick = pick.sort().values
            images, labels, rows = images[pick], labels[pick], rows[pick.numpy()]
        if images.shape[1] != self.in_channels:
            raise ConfigError(f"store images have {images.shape[1]} channels but the data has {self.in_channels}")
        fake_tf = self.train_transform(native_size=int(images.shape[-1]))  # padding fits the fake images
        fake = FakeDataset(images, store_labels(labels, self.task), fake_tf, offset)
        self.n_real, self.n_fake = dataset_len(real_train), len(fake)
        self.num_train_indices = offset + len(fake)
        self._store_rows, self._store = rows, store
        self._log_filter_histogram()
        return ConcatDataset([real_train, fake])

    def _log_filter_histogram(self) -> None:
        """Show the store's filter histograms (``filter_hist.png``) in every logger that takes images (W&B)."""
        trainer = getattr(self, "trainer", None)
        hist = os.path.join(self.store_path, "filter_hist.png")
        if trainer is None or not os.path.isfile(hist):
            return
        log_image(trainer, "store/filter_hist", hist)

    def stored_teacher_outputs(self, teacher_sha256: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(indices, teacher logits)`` of the fake samples when the store's filtering teacher is this one.

        ``None`` when the store was filtered by another teacher, at another image size, or holds no
        teacher outputs. DistillModule's teacher cache takes them instead of running the teacher.
        """
        if self._store is None or self._store_rows is None or self.augment:
            return None
        s = self._store.settings
        if s.get("teacher_sha256") != teacher_sha256 or s.get("teacher_image_size") != image_size:
            return None
        table = self._store.table()
        if "teacher" not in table.columns:
            return None
        logits = torch.from_numpy(table["teacher"][self._store_rows]).float()
        assert self.num_train_indices is not None  # set by setup() with the store
        index = torch.arange(self.n_fake) + (self.num_train_indices - self.n_fake)
        return index, logits

    def train_dataloader(self) -> TRAIN_DATALOADERS:
        if self.fake_share is None:
            return super().train_dataloader()
        from kd_lightning.data.sampler import ResumableDataLoader

        if self.train_dataset is None:
            raise RuntimeError("setup() has not built this split yet")
        sampler = ShareSampler(self.n_real, self.n_fake, self.batch_size, self.fake_share, self.shuffle_seed())
        return ResumableDataLoader(
            self.train_dataset,
            sampler=sampler,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.shuffle_seed()),
        )


__all__ = [
    "DATASET_FACTS",
    "AugmentedDataModule",
    "FakeDataset",
    "FakeTrainDataModule",
    "FilteredDataModule",
    "GeneratedDataModule",
    "ShareSampler",
    "balanced_prefix",
    "store_samples",
]
