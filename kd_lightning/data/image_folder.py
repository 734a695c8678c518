"""Classification from a folder per class: ``<root>/<train_dir>/<class>/*.jpg`` and a test folder.

Covers any dataset kept as class folders. ImageNet-100, Stanford Dogs, MIT67 and FGVC-Aircraft have
their own loaders that read their distributed formats (:mod:`kd_lightning.data.imagenet100`,
:mod:`kd_lightning.data.fine_grained`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split
from kd_lightning.data.image_files import ImageFileDataset, list_images, require_dir
from kd_lightning.errors import DataNotFoundError


class ImageFolderDataModule(ImageDataModule):
    """Images under ``<root>/<train_dir>/<class>/`` and ``<root>/<test_dir>/<class>/``.

    Classes are the sub-folders of the training folder, sorted (or ``classes``, a subset in the
    given order, e.g. the 100 ImageNet-100 wnids). Every image is resized to ``image_size``.

    Args:
        root: dataset folder.
        train_dir: training folder under ``root``.
        test_dir: test folder under ``root``; ``None`` takes ``test`` if present, else ``val``.
        classes: class folder names to keep (and their label order); ``None`` keeps all.
        grayscale: load single-channel images (``in_channels = 1``).
        verify: decode every image once at setup (slow on big sets; corrupt files always fail on load).
        image_size: side of the (square) resized images; defaults to ``native_size`` (224).
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    native_size = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        test_dir: str | None = None,
        classes: list[str] | None = None,
        grayscale: bool = False,
        verify: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.native_size = self.image_size  # images are resized to image_size on load
        self.train_dir, self.test_dir, self.verify = train_dir, test_dir, verify
        self.folder = Path(root)
        if grayscale:
            self.in_channels, self.mean, self.std = 1, (0.449,), (0.226,)
        self.requested_classes = classes
        self.classes: list[str] = []
        train = Path(root) / train_dir
        if train.is_dir():
            self.classes = self._find_classes()
            self.num_classes = len(self.classes)
        else:
            # Errors raised while kdl builds the objects reach the user wrapped in a parser message, so
            # a missing folder is reported by setup(); 2 is a placeholder that is never trained.
            self.num_classes = 2

    def _find_classes(self) -> list[str]:
        train = require_dir(self.folder / self.train_dir, f"{type(self).__name__} training folder")
        found = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
        if self.requested_classes is not None:
            missing = [c for c in self.requested_classes if c not in found]
            if missing:
                raise DataNotFoundError(f"classes {missing[:5]} have no folder under {str(train)!r}")
            found = list(self.requested_classes)
        if len(found) < 2:
            raise DataNotFoundError(f"{str(train)!r} holds {len(found)} class folders; expected at least 2")
        return found

    def _split_dir(self, split: Split) -> Path:
        root = self.folder
        if split == "train":
            return root / self.train_dir
        if self.test_dir is not None:
            return require_dir(root / self.test_dir, f"{type(self).__name__} test folder")
        for name in ("test", "val"):
            if (root / name).is_dir():
                return root / name
        raise DataNotFoundError(f"no test folder under {str(root)!r}; expected 'test/' or 'val/' (or set test_dir)")

    def build_dataset(self, split: Split) -> Dataset:
        if not self.classes:
            self.classes = self._find_classes()
        folder = self._split_dir(split)
        paths, labels = [], []
        for y, name in enumerate(self.classes):
            class_dir = require_dir(folder / name, f"class {name!r}")
            files = list_images(class_dir)
            if not files:
                raise DataNotFoundError(f"class folder {str(class_dir)!r} holds no images (.jpg/.png/...)")
            paths += files
            labels += [y] * len(files)
        return ImageFileDataset(
            paths, labels, size=self.image_size, mode="L" if self.in_channels == 1 else "RGB", verify=self.verify
        )
