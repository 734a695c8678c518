"""Tiny-ImageNet-200 in its standard ``tiny-imagenet-200`` layout (64x64 colour, 200 classes).

Layout::

    <root>/tiny-imagenet-200/wnids.txt                         one wnid per line (the classes)
    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG        500 per class
    <root>/tiny-imagenet-200/val/images/*.JPEG                 10,000 images
    <root>/tiny-imagenet-200/val/val_annotations.txt           file<TAB>wnid<TAB>x0 y0 x1 y1

The official test images carry no labels, so the labelled ``val`` set is the test split here and
validation is carved from ``train`` (as everywhere in kd_lightning). ``root`` may also point directly
at ``tiny-imagenet-200``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split
from kd_lightning.data.image_files import ImageFileDataset, list_images, require_dir, require_file
from kd_lightning.errors import DataNotFoundError


class TinyImageNetDataModule(ImageDataModule):
    """Tiny-ImageNet: 100,000 training and 10,000 labelled validation (= test) images.

    ``num_classes`` is read from ``wnids.txt`` when the files are there (200 for the real set).
    """

    num_classes = 200
    native_size = 64
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2770, 0.2691, 0.2821)
    folder = "tiny-imagenet-200"

    def __init__(self, root: str | None = None, verify: bool = False, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.verify = verify
        wnids = self._base() / "wnids.txt" if root is not None else None
        if wnids is not None and wnids.is_file():
            self.num_classes = len(self._wnids())

    def _base(self) -> Path:
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder holding {self.folder}/>")
        root = Path(self.root)
        return root if (root / "wnids.txt").is_file() else root / self.folder

    def _wnids(self) -> list[str]:
        path = require_file(self._base() / "wnids.txt", f"Tiny-ImageNet class list (root={self.root!r})")
        wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
        if len(wnids) < 2:
            raise DataNotFoundError(f"{path} lists {len(wnids)} classes; expected one wnid per line")
        return wnids

    def build_dataset(self, split: Split) -> Dataset:
        base = self._base()
        wnids = self._wnids()
        index = {w: i for i, w in enumerate(wnids)}
        paths: list[Path] = []
        labels: list[int] = []
        if split == "train":
            for w in wnids:
                folder = require_dir(base / "train" / w / "images", f"training images of class {w}")
                files = list_images(folder)
                if not files:
                    raise DataNotFoundError(f"class folder {str(folder)!r} holds no images")
                paths += files
                labels += [index[w]] * len(files)
        else:
            ann = require_file(base / "val" / "val_annotations.txt", "Tiny-ImageNet validation labels")
            for n, line in enumerate(ann.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split("\t") if "\t" in line else line.split()
                if len(parts) < 2 or parts[1] not in index:
                    raise DataNotFoundError(
                        f"{ann}:{n}: {line!r}; expected '<file>\\t<wnid listed in wnids.txt>\\t...'"
                    )
                paths.append(base / "val" / "images" / parts[0])
                labels.append(index[parts[1]])
            if not paths:
                raise DataNotFoundError(f"{ann} lists no images")
        return ImageFileDataset(paths, labels, size=self.native_size, verify=self.verify)
