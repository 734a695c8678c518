"""The base DataModule every dataset in kd_lightning builds on.

Every batch is a dict: ``image`` (float in [0, 1], N x C x H x W; models normalise internally),
``label`` (int64 class, or float32 in [0, 1] for regression) and ``index`` (the sample's position
in the underlying training or test set, stable across epochs and splits; self-KD and CRD key on it).

A concrete DataModule sets the dataset facts (``num_classes``, ``in_channels``, ``native_size``,
``mean``, ``std``; regression sets ``task = "regression"`` and ``label_range``) and implements
:meth:`ImageDataModule.build_dataset`. Everything else — a seeded validation split carved from
train, an optional stratified training subset, augmentation, padding/resizing, loaders — is here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sized
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from kd_lightning.data.utils import (  # noqa: F401  (re-exported: their old home)
    IndexedDataset,
    TensorDataset,
    UInt8Transform,
    augments,
    dataset_labels,
    dataset_len,
    default_num_workers,
    stratified_subset,
)
from kd_lightning.errors import ConfigError

Split = Literal["train", "test"]


class ImageDataModule(L.LightningDataModule):
    """Base DataModule: seeded train/val split, optional training subset, augmentation, loaders.

    Args:
        root: folder holding the dataset's files (each dataset documents its layout).
        batch_size: training batch size (evaluation uses ``eval_batch_size`` or twice this).
        val_fraction: share of the training set held out for validation (model selection);
            the test split is never used for selection.
        train_size: use a stratified random subset of this many training samples (after the
            validation split), e.g. a limited-data setting; ``None`` keeps all.
        image_size: pad (or resize) images to this size, e.g. 32 for CIFAR-style nets;
            ``None`` keeps the native size.
        resize_mode: ``"pad"`` centres the image on a zero canvas, ``"resize"`` interpolates.
        augment: random crop (4 px padding, scaled to the image size) and, where the dataset
            allows it, horizontal flips, on training images only.
        num_workers: DataLoader workers; ``None`` picks 0 on <= 2 cores, else up to 8.
        seed: seed of the validation split and the training subset.
        class_pairs: serve every training sample with a random other sample of its class
            (``pair_image``, ``pair_label``, ``pair_index`` in the batch), as CS-KD needs; the
            pairs depend only on (seed, epoch), so resumption stays exact
            (:mod:`kd_lightning.data.pairs`).
    """

    # Dataset facts; concrete DataModules set these.
    num_classes: int | None = None
    in_channels: int = 3
    native_size: int = 32
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    task: str = "classification"
    label_range: tuple[float, float] | None = None
    hflip: bool = True

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        train_size: int | None = None,
        image_size: int | None = None,
        resize_mode: Literal["pad", "resize"] = "pad",
        augment: bool = True,
        num_workers: int | None = None,
        seed: int = 0,
        class_pairs: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; expected a positive integer")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction={val_fraction}; expected a number in [0, 1)")
        if train_size is not None and train_size < 1:
            raise ConfigError(f"train_size={train_size}; expected a positive integer or null")
        if image_size is not None and image_size < 1:
            raise ConfigError(f"image_size={image_size}; expected a positive integer or null")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(
                f"num_workers={num_workers}; expected 0 (load in the main process), a positive number of "
                "worker processes, or null (chosen from the CPU cores)"
            )
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_fraction = val_fraction
        self.train_size = train_size
        self.image_size = image_size or self.native_size
        self.resize_mode = resize_mode
        self.augment = augment
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.seed = seed
        self.class_pairs = class_pairs
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

    # ----------------------------------------------------------------- to implement
    def build_dataset(self, split: Split) -> Dataset:
        """Return the raw ``split`` as a dataset of ``(image, label)`` pairs.

        Images are uint8 tensors (C x H x W) or PIL images; labels are class ids or raw
        regression values (normalised here through ``label_range``). Raise
        :class:`~kd_lightning.errors.DataNotFoundError` naming the path when files are missing.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- transforms
    def _resize(self, native_size: int | None = None) -> list[Callable]:
        native = self.native_size if native_size is None else native_size
        if self.image_size == native:
            return []
        if self.resize_mode == "pad" and self.image_size > native:
            extra = self.image_size - native
            return [v2.Pad([extra // 2, extra // 2, extra - extra // 2, extra - extra // 2])]
        return [v2.Resize([self.image_size, self.image_size], antialias=True)]

    def train_transform(self, native_size: int | None = None) -> Callable:
        """uint8/PIL image -> float tensor in [0, 1], with augmentation when ``augment``.

        ``native_size``: the side of the images it will see when not the dataset's own ``native_size``
        (generated images joined to a real training set), so that padding or resizing fits them.
        """
        ops: list[Callable] = [v2.ToImage(), *self._resize(native_size)]
        if self.augment:
            ops.append(v2.RandomCrop(self.image_size, padding=max(1, self.image_size // 8)))
            if self.hflip:
                ops.append(v2.RandomHorizontalFlip())
        ops.append(v2.ToDtype(torch.float32, scale=True))
        return UInt8Transform.from_ops(v2.Compose(ops))

    def eval_transform(self) -> Callable:
        """uint8/PIL image -> float tensor in [0, 1], no randomness."""
        return UInt8Transform.from_ops(
            v2.Compose([v2.ToImage(), *self._resize(), v2.ToDtype(torch.float32, scale=True)])
        )

    def target_transform(self) -> Callable | None:
        """Regression labels are mapped to [0, 1] through ``label_range``; class ids pass."""
        if self.task != "regression":
            return None
        if self.label_range is None:
            raise ConfigError(f"{type(self).__name__} is a regression DataModule without label_range")
        lo, hi = self.label_range

        def normalise(y: object) -> torch.Tensor:
            return ((torch.as_tensor(y, dtype=torch.float32) - lo) / (hi - lo)).clamp(0.0, 1.0)

        return normalise

    # ----------------------------------------------------------------- splits
    def _split_indices(self, base: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        n = dataset_len(base)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g)
        n_val = round(self.val_fraction * n)
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        if self.train_size is not None and self.train_size >= len(train_idx):
            rank_zero_warn(
                f"train_size={self.train_size} but {type(self).__name__} has {len(train_idx)} training samples "
                f"after the validation split (val_fraction={self.val_fraction}): using all {len(train_idx)}"
            )
        if self.train_size is not None and self.train_size < len(train_idx):
            labels = dataset_labels(base)[train_idx]
            keep = stratified_subset(labels, self.train_size, g)
            train_idx = train_idx[keep]
        return train_idx, val_idx

    def setup(self, stage: str | None = None) -> None:
        tt = self.target_transform()
        if stage in ("fit", "validate", None) and self.train_dataset is None:
            base = self.build_dataset("train")
            train_idx, val_idx = self._split_indices(base)
            if self.val_fraction == 0 and stage in ("fit", None):
                rank_zero_warn(
                    "val_fraction=0: no validation split, so no validation metrics and no best.ckpt (nothing to "
                    "select on); checkpoints/last.ckpt is written and is the model to use"
                )
            self.train_dataset = Subset(IndexedDataset(base, self.train_transform(), tt), train_idx.tolist())
            self.val_dataset = Subset(IndexedDataset(base, self.eval_transform(), tt), val_idx.tolist())
        if stage in ("test", "predict", None) and self.test_dataset is None:
            self.test_dataset = IndexedDataset(self.build_dataset("test"), self.eval_transform(), tt)
            self.predict_dataset = self.test_dataset

    # ----------------------------------------------------------------- loaders
    def _loader(self, ds: Dataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if ds is None:
            raise RuntimeError("setup() has not built this split yet")
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and dataset_len(ds) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def shuffle_seed(self) -> int:
        """Seed of the training order: the data ``seed`` combined with the run's ``seed_everything`` value."""
        return self.seed * 1_000_003 + int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        """Shuffled, resumable training batches (see :mod:`kd_lightning.data.sampler`).

        The order is a function of (seed, epoch), sharded by the trainer's rank under DDP, and the
        loader's position is saved in checkpoints so ``--ckpt_path last`` continues mid-epoch exactly.
        """
        from kd_lightning.data.sampler import ResumableDataLoader, ResumableSampler

        ds = self.train_dataset
        if ds is None:
            raise RuntimeError("setup() has not built this split yet")
        if not isinstance(ds, Sized):
            raise TypeError(f"the training set needs a length; {type(ds).__name__} has no __len__")
        trainer = getattr(self, "trainer", None)
        dist_kwargs = (getattr(trainer, "distributed_sampler_kwargs", None) or {}) if trainer is not None else {}
        replicas, rank = int(dist_kwargs.get("num_replicas", 1)), int(dist_kwargs.get("rank", 0))
        per_rank = len(ds) // replicas
        sampler: ResumableSampler
        sampler_kwargs: dict[str, Any] = dict(
            seed=self.shuffle_seed(), shuffle=True, num_replicas=replicas, rank=rank, drop_last=replicas > 1
        )
        if self.class_pairs:
            from kd_lightning.data.pairs import ClassPairSampler, PairedDataset

            sampler = ClassPairSampler(ds, dataset_labels(ds).long(), **sampler_kwargs)
            ds = PairedDataset(ds)
        else:
            sampler = ResumableSampler(ds, **sampler_kwargs)
        return ResumableDataLoader(
            ds,
            sampler=sampler,
            batch_size=self.batch_size,
            drop_last=per_rank > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # iterator creation draws a base seed: take it from here, not from the global RNG
            generator=torch.Generator().manual_seed(self.shuffle_seed()),
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.val_fraction == 0:
            return []  # no validation split: Lightning skips validation
        return self._loader(self.val_dataset, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, False, self.eval_batch_size)
