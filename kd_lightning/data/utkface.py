"""UTKFace age regression from the aligned-and-cropped face files (the cGAN-KD regression setting).

Layout: a folder of images named ``<age>_<gender>_<race>_<date&time>.jpg`` (the "Aligned&Cropped
Faces" release also uses ``....jpg.chip.jpg``); only the leading age field is read. ``root`` is
that folder or a folder holding ``UTKFace/``. Following cGAN-KD, ages in ``[min_age, max_age]``
(1-60) are kept, images are 64x64 and 20% of the images of every age are held out for testing
(a fixed split, independent of ``seed``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split
from kd_lightning.data.image_files import ImageFileDataset, grouped_holdout, is_image_file
from kd_lightning.errors import ConfigError, DataNotFoundError

_AGE = re.compile(r"^(\d+)_")


class UTKFaceDataModule(ImageDataModule):
    """Age (years) from UTKFace face images; labels normalised to [0, 1] over ``[min_age, max_age]``.

    Args:
        root: folder of UTKFace images (or holding ``UTKFace/``).
        min_age: youngest age kept.
        max_age: oldest age kept.
        test_fraction: share of every age held out as the test set.
        verify: decode every image once at setup.
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    task = "regression"
    native_size = 64
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    label_range = (1.0, 60.0)
    SPLIT_SEED = 2021

    def __init__(
        self,
        root: str | None = None,
        min_age: int = 1,
        max_age: int = 60,
        test_fraction: float = 0.2,
        verify: bool = False,
        **kwargs: Any,
    ) -> None:
        if not 0 <= min_age < max_age:
            raise ConfigError(f"min_age={min_age}, max_age={max_age}; expected 0 <= min_age < max_age")
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction={test_fraction}; expected a number in (0, 1)")
        super().__init__(root=root, **kwargs)
        self.min_age, self.max_age, self.test_fraction, self.verify = min_age, max_age, test_fraction, verify
        self.label_range = (float(min_age), float(max_age))

    def _folder(self) -> Path:
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder of UTKFace images>")
        root = Path(self.root)
        folder = root / "UTKFace" if (root / "UTKFace").is_dir() else root
        if not folder.is_dir():
            raise DataNotFoundError(f"UTKFace folder {str(folder)!r} does not exist")
        return folder

    def scan(self) -> tuple[list[Path], torch.Tensor]:
        """Image files with a parsable age in range, and their ages."""
        folder = self._folder()
        paths, ages = [], []
        for p in sorted(folder.iterdir()):
            m = _AGE.match(p.name)
            if m and is_image_file(p) and self.min_age <= int(m.group(1)) <= self.max_age:
                paths.append(p)
                ages.append(int(m.group(1)))
        if not paths:
            raise DataNotFoundError(
                f"no UTKFace images under {str(folder)!r}; expected files named "
                f"'<age>_<gender>_<race>_<datetime>.jpg' with age in [{self.min_age}, {self.max_age}]"
            )
        return paths, torch.tensor(ages, dtype=torch.float32)

    def build_dataset(self, split: Split) -> Dataset:
        paths, ages = self.scan()
        test = grouped_holdout(ages, self.test_fraction, self.SPLIT_SEED)
        keep = test if split == "test" else ~test
        idx = keep.nonzero().flatten().tolist()
        return ImageFileDataset([paths[i] for i in idx], ages[idx], size=self.native_size, verify=self.verify)
