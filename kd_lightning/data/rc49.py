"""RC-49: 64x64 renderings of 49 3-D chair models at yaw angles in (0, 90) degrees (CcGAN's benchmark).

Reads the public HDF5 release (``RC-49_64x64.h5``) with datasets ``images`` (N x 3 x 64 x 64 or
N x 64 x 64 x 3, uint8) and ``labels`` (yaw angle in degrees, N). Needs ``h5py`` (``pip install
h5py``); without it the DataModule says so. 20% of the images of every angle form the test set.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split, TensorDataset
from kd_lightning.data.image_files import grouped_holdout
from kd_lightning.errors import ConfigError, DataNotFoundError


def _h5py() -> ModuleType:
    try:
        import h5py
    except ImportError:
        raise ConfigError(
            "RC49DataModule reads the RC-49 HDF5 file and needs the h5py package, which is not "
            "installed; run `pip install h5py`"
        ) from None
    return h5py


class RC49DataModule(ImageDataModule):
    """Chair yaw angle (degrees) regression on RC-49; labels normalised over ``[min_angle, max_angle]``.

    Args:
        root: folder holding ``file`` (or the ``.h5`` file itself).
        file: HDF5 file name under ``root``.
        min_angle: smallest angle kept.
        max_angle: largest angle kept.
        test_fraction: share of every angle held out as the test set.
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    task = "regression"
    native_size = 64
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    hflip = False  # mirroring turns yaw a into -a
    label_range = (0.0, 90.0)
    SPLIT_SEED = 2021

    def __init__(
        self,
        root: str | None = None,
        file: str = "RC-49_64x64.h5",
        min_angle: float = 0.0,
        max_angle: float = 90.0,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        if not min_angle < max_angle:
            raise ConfigError(f"min_angle={min_angle}, max_angle={max_angle}; expected min_angle < max_angle")
        super().__init__(root=root, **kwargs)
        self.file, self.test_fraction = file, test_fraction
        self.label_range = (float(min_angle), float(max_angle))

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (uint8 N x 3 x H x W) and angles within the range."""
        h5py = _h5py()  # checked here, not in __init__, so kdl reports it as a plain message
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder holding {self.file}>")
        path = Path(self.root)
        path = path if path.is_file() else path / self.file
        if not path.is_file():
            raise DataNotFoundError(f"RC-49 file {str(path)!r} does not exist; expected the HDF5 release {self.file}")
        try:
            with h5py.File(path, "r") as f:
                images, labels = np.asarray(f["images"][:]), np.asarray(f["labels"][:], dtype=np.float32)
        except (OSError, KeyError) as e:
            raise DataNotFoundError(
                f"{str(path)!r} is not the RC-49 HDF5 file ({e}); expected datasets "
                "'images' (N x 3 x 64 x 64 uint8) and 'labels' (N)"
            ) from None
        if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8 or labels.shape != (len(images),):
            raise DataNotFoundError(
                f"{str(path)!r}: images {images.shape} {images.dtype}, labels {labels.shape}; "
                "expected N x 3 x H x W uint8 images and N angles"
            )
        lo, hi = self.label_range
        keep = (labels >= lo) & (labels <= hi)
        return torch.from_numpy(np.ascontiguousarray(images[keep])), torch.from_numpy(labels[keep])

    def build_dataset(self, split: Split) -> Dataset:
        images, labels = self.load()
        test = grouped_holdout(labels, self.test_fraction, self.SPLIT_SEED)
        keep = test if split == "test" else ~test
        return TensorDataset(images[keep], labels[keep])
