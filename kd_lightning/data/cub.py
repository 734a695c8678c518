"""Caltech-UCSD Birds-200-2011 (CUB-200-2011): 11,788 images of 200 bird species.

Layout (as extracted from ``CUB_200_2011.tgz``)::

    <root>/CUB_200_2011/images.txt               "<image id> <relative path>"
    <root>/CUB_200_2011/image_class_labels.txt   "<image id> <class id, 1-based>"
    <root>/CUB_200_2011/train_test_split.txt     "<image id> <1 = train, 0 = test>"
    <root>/CUB_200_2011/classes.txt              "<class id> <name>"
    <root>/CUB_200_2011/bounding_boxes.txt       "<image id> <x> <y> <width> <height>" (bbox_crop only)
    <root>/CUB_200_2011/images/<class folder>/<file>.jpg

``root`` may also point directly at ``CUB_200_2011``. The official split has 5,994 training and
5,794 test images; validation is carved from training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split
from kd_lightning.data.image_files import ImageFileDataset, require_file
from kd_lightning.errors import DataNotFoundError


def read_id_table(path: Path, columns: int, what: str) -> dict[int, list[str]]:
    """``{id: [fields...]}`` from a whitespace-separated CUB metadata file, with line-level errors."""
    require_file(path, what)
    table: dict[int, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns)
        if len(parts) < columns + 1 or not parts[0].isdigit():
            raise DataNotFoundError(f"{path}:{n}: {line!r}; expected '<id>' followed by {columns} field(s)")
        table[int(parts[0])] = parts[1:]
    if not table:
        raise DataNotFoundError(f"{path} is empty; expected {what}")
    return table


class CUB200DataModule(ImageDataModule):
    """CUB-200-2011 fine-grained bird classification (the AI-KD setting: 224 px, batch 32).

    Args:
        root: folder holding ``CUB_200_2011/`` (or that folder itself).
        bbox_crop: crop each image to its annotated bounding box before resizing.
        verify: decode every image once at setup (corrupt files always fail when loaded).
        image_size: side of the square images fed to the net (default 224).
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    num_classes = 200
    native_size = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    folder = "CUB_200_2011"

    def __init__(
        self,
        root: str | None = None,
        bbox_crop: bool = False,
        verify: bool = False,
        image_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, **kwargs)
        self.native_size = self.image_size  # images are resized to image_size on load
        self.bbox_crop, self.verify = bbox_crop, verify
        if root is not None and (self._base() / "classes.txt").is_file():
            self.num_classes = len(read_id_table(self._base() / "classes.txt", 1, "the class list"))

    def _base(self) -> Path:
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder holding {self.folder}/>")
        root = Path(self.root)
        return root if (root / "images.txt").is_file() else root / self.folder

    def build_dataset(self, split: Split) -> Dataset:
        base = self._base()
        if not base.is_dir():
            raise DataNotFoundError(
                f"CUB-200-2011 not found: {str(base)!r} does not exist; expected the extracted "
                f"{self.folder}/ folder with images.txt, image_class_labels.txt, ..."
            )
        images = read_id_table(base / "images.txt", 1, "image paths")
        labels = read_id_table(base / "image_class_labels.txt", 1, "image labels")
        is_train = read_id_table(base / "train_test_split.txt", 1, "the train/test split")
        boxes = read_id_table(base / "bounding_boxes.txt", 4, "bounding boxes") if self.bbox_crop else None
        want = "1" if split == "train" else "0"
        paths, ys = [], []
        crops: list[tuple[float, float, float, float]] = []
        for image_id, (rel,) in sorted(images.items()):
            for table, name in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")) + (
                ((boxes, "bounding_boxes.txt"),) if boxes is not None else ()
            ):
                if image_id not in table:
                    raise DataNotFoundError(f"image id {image_id} ({rel}) is missing from {base / name}")
            if is_train[image_id][0].strip() != want:
                continue
            y = int(labels[image_id][0]) - 1
            if not 0 <= y < self.num_classes:
                raise DataNotFoundError(
                    f"{base / 'image_class_labels.txt'}: image {image_id} has class {y + 1}; "
                    f"expected 1..{self.num_classes}"
                )
            paths.append(base / "images" / rel.strip())
            ys.append(y)
            if boxes is not None:
                x, y0, w, h = (float(v) for v in boxes[image_id])
                crops.append((x, y0, w, h))
        if not paths:
            raise DataNotFoundError(f"{base / 'train_test_split.txt'} marks no image as {split}")
        return ImageFileDataset(
            paths, ys, size=self.native_size, boxes=crops if boxes is not None else None, verify=self.verify
        )
