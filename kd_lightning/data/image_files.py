"""Shared helpers for datasets stored as image files: decoding with checks, file datasets, splits.

Every image is decoded with PIL and fully loaded, so a zero-byte, truncated or corrupt file raises
:class:`~kd_lightning.errors.DataNotFoundError` naming the file instead of loading silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset

from kd_lightning.errors import DataCorruptError, DataNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
Box = tuple[float, float, float, float]

# PIL's default already refuses truncated files; make sure nothing in the process relaxed it.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def is_image_file(path: str | os.PathLike) -> bool:
    """Return whether ``path`` ends in one of the image extensions we read (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Decode ``path`` completely and convert it to ``mode``; a clear error for any unreadable file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise DataNotFoundError(f"image file {str(path)!r} does not exist") from None
    if size == 0:
        raise DataNotFoundError(f"image file {str(path)!r} is empty (0 bytes); expected a JPEG/PNG image")
    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte: truncated files fail here
            return img.convert(mode)
    except Image.DecompressionBombError as e:
        raise DataCorruptError(
            f"image file {str(path)!r} is too large to decode safely ({e}); expected an image within "
            "PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataCorruptError(
            f"image file {str(path)!r} is corrupt or truncated ({e}); expected a readable image"
        ) from None


def check_files(paths: Sequence[str | os.PathLike]) -> None:
    """Cheap integrity check of every file (exists, non-empty) without decoding."""
    for p in paths:
        try:
            size = os.stat(p).st_size
        except OSError:
            raise DataNotFoundError(f"image file {str(p)!r} does not exist (listed by the dataset's index)") from None
        if size == 0:
            raise DataNotFoundError(f"image file {str(p)!r} is empty (0 bytes); expected a JPEG/PNG image")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted; hidden files skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p))


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder; else an error saying whether it is missing or a file."""
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(f"{what}: folder {str(path)!r} {state}")
    return path


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file; else an error saying whether it is missing or a folder."""
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataNotFoundError(f"{what}: file {str(path)!r} {state}")
    return path


class ImageFileDataset(Dataset):
    """``(PIL image, label)`` pairs read from image files on each access.

    Args:
        paths: image files.
        labels: class ids or raw regression values, one per file.
        size: resize every image to ``size x size`` (bilinear, antialiased) after the optional
            crop, so batches stack; ``None`` keeps the file's size.
        mode: PIL mode, ``"RGB"`` or ``"L"``.
        boxes: optional ``(x, y, width, height)`` crop per image (e.g. CUB bounding boxes).
        verify: decode every file once now, so a corrupt file fails before training starts.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[float] | torch.Tensor,
        size: int | None = None,
        mode: str = "RGB",
        boxes: Sequence[Box] | None = None,
        verify: bool = False,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} image files but {len(labels)} labels")
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"{len(paths)} image files but {len(boxes)} boxes")
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(labels)
        self.size = size
        self.mode = mode
        self.boxes = boxes
        check_files(self.paths)
        if verify:
            for p in self.paths:
                load_image(p, mode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, torch.Tensor]:
        img = load_image(self.paths[i], self.mode)
        if self.boxes is not None:
            x, y, w, h = self.boxes[i]
            img = img.crop((int(x), int(y), int(round(x + w)), int(round(y + h))))  # noqa: RUF046 (numpy/torch scalars)
        if self.size is not None and img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, reducing_gap=None)
        return img, self.targets[i]


def grouped_holdout(groups: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask of a seeded hold-out of ``fraction`` of the samples of every group.

    Used for the papers' "80/20 per age" (UTKFace) and "per angle interval" (Steering Angle) splits;
    independent of the training seed so that the test set never changes.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    for v in groups.unique():
        idx = (groups == v).nonzero().flatten()
        k = round(fraction * len(idx))
        mask[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return mask
