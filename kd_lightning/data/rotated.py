"""Angle regression made from any image dataset by rotating real images by known angles.

Like RC-49's rendered yaw angles, the label is a physical transform applied to a real image: each
source image is rotated by an angle drawn once (seeded) from ``[min_angle, max_angle]``, and the
regression target is that angle. The centre square that stays inside the image at every angle of
the range is kept (so black corners do not give the angle away) and resized back. Train,
validation and test are split by source image: no source image is in two splits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from kd_lightning.data.base import ImageDataModule, Split, dataset_len, stratified_subset
from kd_lightning.errors import ConfigError


def inscribed_side(size: int, max_abs_angle: float) -> int:
    """Side of the largest axis-aligned square inside a ``size`` square rotated by up to ``max_abs_angle``."""
    a = math.radians(min(abs(max_abs_angle), 45.0))
    return max(1, math.floor(size / (math.cos(a) + math.sin(a))))


class RotatedDataset(Dataset):
    """``(rotated image, angle)`` pairs; item ``i`` is source ``i % len(base)``, rotated by ``angles[i]``."""

    def __init__(self, base: Dataset, angles: torch.Tensor, size: int, crop: int) -> None:
        self.base, self.angles, self.size, self.crop = base, angles, size, crop
        self.targets = angles
        self.n_src = dataset_len(base)

    def __len__(self) -> int:
        return len(self.angles)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.base[i % self.n_src]
        img = TF.to_image(image)
        img = TF.rotate(img, float(self.angles[i]), interpolation=v2.InterpolationMode.BILINEAR)
        if self.crop < min(img.shape[-2:]):
            img = TF.center_crop(img, [self.crop, self.crop])
            img = TF.resize(img, [self.size, self.size], antialias=True)
        return img, self.angles[i]


class RotatedDataModule(ImageDataModule):
    """Rotation-angle regression on the images of another DataModule (its labels are ignored).

    Args:
        datamodule: the source of real images (e.g. ``CIFAR10DataModule``, ``CUB200DataModule``);
            only its ``build_dataset`` and image facts are used, its loaders are not.
        min_angle: smallest rotation, degrees (counter-clockwise).
        max_angle: largest rotation, degrees.
        rotations_per_image: rotated copies of every source image (each with its own angle).
        crop_corners: keep only the centre square valid at every angle (then resize back).
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule` (batching, splits, augmentation).
    """

    task = "regression"
    hflip = False  # a mirrored image would need the opposite angle
    ANGLE_SEED = 4242

    def __init__(
        self,
        datamodule: ImageDataModule,
        min_angle: float = -45.0,
        max_angle: float = 45.0,
        rotations_per_image: int = 1,
        crop_corners: bool = True,
        **kwargs: Any,
    ) -> None:
        if not min_angle < max_angle:
            raise ConfigError(f"min_angle={min_angle}, max_angle={max_angle}; expected min_angle < max_angle")
        if rotations_per_image < 1:
            raise ConfigError(f"rotations_per_image={rotations_per_image}; expected a positive integer")
        self.source = datamodule
        self.native_size = datamodule.native_size
        self.in_channels, self.mean, self.std = datamodule.in_channels, datamodule.mean, datamodule.std
        kwargs.setdefault("seed", datamodule.seed)
        super().__init__(root=datamodule.root, **kwargs)
        self.min_angle, self.max_angle, self.k, self.crop_corners = (
            min_angle,
            max_angle,
            rotations_per_image,
            crop_corners,
        )
        self.label_range = (float(min_angle), float(max_angle))

    def build_dataset(self, split: Split) -> Dataset:
        base = self.source.build_dataset(split)
        n = dataset_len(base)
        g = torch.Generator().manual_seed(self.ANGLE_SEED + (split == "test"))
        angles = self.min_angle + (self.max_angle - self.min_angle) * torch.rand(n * self.k, generator=g)
        size = self.native_size
        worst = max(abs(self.min_angle), abs(self.max_angle))
        crop = inscribed_side(size, worst) if self.crop_corners else size
        return RotatedDataset(base, angles, size, crop)

    def _split_indices(self, base: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation holds whole source images (all their rotated copies)."""
        if not isinstance(base, RotatedDataset):
            raise TypeError(f"expected the RotatedDataset that build_dataset returns, got {type(base).__name__}")
        n_src = base.n_src
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n_src, generator=g)
        n_val = round(self.val_fraction * n_src)
        is_val = torch.zeros(n_src, dtype=torch.bool)
        is_val[perm[:n_val]] = True
        src = torch.arange(len(base)) % n_src
        val_idx, train_idx = is_val[src].nonzero().flatten(), (~is_val[src]).nonzero().flatten()
        if self.train_size is not None and self.train_size < len(train_idx):
            train_idx = train_idx[stratified_subset(base.targets[train_idx], self.train_size, g)]
        return train_idx, val_idx
