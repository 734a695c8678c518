"""ImageNet-100: 100 ImageNet classes read from the standard ImageNet train/val folder layout.

Layout (ILSVRC-2012 with the validation images sorted into class folders, as torchvision's
``ImageFolder`` and most training scripts expect)::

    <root>/train/<wnid>/*.JPEG     ~1,300 per class
    <root>/val/<wnid>/*.JPEG       50 per class (the test split here; validation is carved from train)

Only the classes of a class-list file are read; the other 900 folders may be present or not. The
package ships the CMC paper's list (``imagenet100_cmc.txt``, see its header for the source); any
file with one WordNet id per line (``#`` comments allowed) can be named instead.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import Split
from kd_lightning.data.image_files import ImageFileDataset
from kd_lightning.data.image_folder import ImageFolderDataModule
from kd_lightning.errors import ConfigError, DataNotFoundError

#: class lists shipped with the package, by name
CLASS_LISTS = {"cmc": "imagenet100_cmc.txt"}
_WNID = re.compile(r"^n\d{8}$")


def read_class_list(name_or_path: str) -> list[str]:
    """The wnids of a shipped class list (``"cmc"``) or of a class-list file, in the file's order."""
    if name_or_path in CLASS_LISTS:
        text = resources.files("kd_lightning.data").joinpath(CLASS_LISTS[name_or_path]).read_text()
        where = f"the shipped list {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"class_list={name_or_path!r}: no such file; expected one of {sorted(CLASS_LISTS)} "
                "or a file with one WordNet id (n########) per line"
            )
        text, where = path.read_text(), repr(str(path))
    wnids = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not _WNID.match(line):
            raise ConfigError(f"{where}, line {n}: {line!r} is not a WordNet id; expected 'n' and 8 digits")
        wnids.append(line)
    if len(set(wnids)) != len(wnids):
        raise ConfigError(f"{where} lists a class twice")
    if len(wnids) < 2:
        raise ConfigError(f"{where} lists {len(wnids)} classes; expected at least 2")
    return wnids


class ImageNet100DataModule(ImageFolderDataModule):
    """ImageNet restricted to the classes of ``class_list`` (labels in sorted wnid order).

    Args:
        root: ImageNet folder holding ``train/`` and ``val/`` with one sub-folder per wnid.
        class_list: ``"cmc"`` (shipped, the default) or the path of a file with one wnid per line.
        train_dir: training folder under ``root``.
        test_dir: test folder under ``root`` (ImageNet's labelled validation set).
        test_split: ``"val"`` tests on ``test_dir``; ``"holdout"`` tests on a fixed random ``holdout_size``
            of the training images instead, as cGAN-KD splits its ImageNet-100 (10,000 test images).
        holdout_size: number of training images held out as the test set with ``test_split="holdout"``.
        image_size: side of the square images (cGAN-KD uses 128; default 224).
        **kwargs: see :class:`~kd_lightning.data.ImageFolderDataModule` (``verify``, ``batch_size``, ...).
    """

    #: seed of the ``test_split="holdout"`` split: fixed, so the test set never depends on the run's seed
    HOLDOUT_SEED = 2017

    def __init__(
        self,
        root: str,
        class_list: str = "cmc",
        train_dir: str = "train",
        test_dir: str = "val",
        test_split: Literal["val", "holdout"] = "val",
        holdout_size: int = 10000,
        **kwargs: Any,
    ) -> None:
        if test_split not in ("val", "holdout"):
            raise ConfigError(f"test_split={test_split!r}; expected 'val' or 'holdout'")
        if holdout_size < 1:
            raise ConfigError(f"holdout_size={holdout_size}; expected a positive number of images")
        wnids = sorted(read_class_list(class_list))
        super().__init__(root=root, train_dir=train_dir, test_dir=test_dir, classes=wnids, **kwargs)
        self.class_list, self.test_split, self.holdout_size = class_list, test_split, holdout_size
        self.num_classes = len(wnids)  # also when the folders are missing (reported by setup())

    def build_dataset(self, split: Split) -> Dataset:
        """Build the ``split`` from ImageNet's train and val folders, or from a hold-out of the training images.

        ``test_split="val"``: ImageNet's train and val folders. ``"holdout"`` (cGAN-KD's protocol): a fixed
        random ``holdout_size`` of the training images is the test set, the rest the training set.
        """
        if self.test_split == "val":
            return super().build_dataset(split)
        full = super().build_dataset("train")
        if not isinstance(full, ImageFileDataset):
            raise TypeError(f"expected the training folder as an ImageFileDataset, got {type(full).__name__}")
        n = len(full)
        if self.holdout_size >= n:
            raise DataNotFoundError(
                f"holdout_size={self.holdout_size} but {str(self._split_dir('train'))!r} holds only {n} "
                "images of the listed classes; expected more training images than the held-out test set"
            )
        held = torch.zeros(n, dtype=torch.bool)
        held[torch.randperm(n, generator=torch.Generator().manual_seed(self.HOLDOUT_SEED))[: self.holdout_size]] = True
        keep = held if split == "test" else ~held
        paths = [p for p, k in zip(full.paths, keep.tolist()) if k]
        mode = "L" if self.in_channels == 1 else "RGB"
        return ImageFileDataset(paths, full.targets[keep], size=self.image_size, mode=mode, verify=self.verify)
