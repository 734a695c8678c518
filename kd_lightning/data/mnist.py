"""MNIST-format datasets (MNIST, Fashion-MNIST) read from the four standard idx files."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split, TensorDataset
from kd_lightning.errors import DataNotFoundError

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES: dict[int, DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (raw or .gz) into a numpy array; a clear error on a malformed file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataNotFoundError(f"cannot read idx file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataNotFoundError(f"{path} is not an idx file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataNotFoundError(
            f"{path} is truncated or padded: header says {dims} ({expected} bytes), found {len(body)} bytes"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def find_idx_file(root: Path, stem: str) -> Path:
    """Return the idx file ``stem`` under ``root``, gzipped or raw; raise DataNotFoundError naming ``root``."""
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):  # also accept the "t10k-images.idx3-ubyte" spelling
        if (root / name).is_file():
            return root / name
    raise DataNotFoundError(
        f"{stem}(.gz) not found under root={str(root)!r}; expected the four idx files "
        f"{', '.join(s + '.gz' for pair in _FILES.values() for s in pair)} (gzipped or raw)"
    )


def load_mnist_split(root: str | os.PathLike, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 N x 1 x H x W) and labels (int64) of one split of an MNIST-format folder."""
    root = Path(root)
    if not root.is_dir():
        state = "is a file" if root.exists() else "does not exist"
        raise DataNotFoundError(
            f"dataset root {str(root)!r} {state}; expected a folder holding the four MNIST-format idx files"
        )
    img_path, lbl_path = (find_idx_file(root, s) for s in _FILES[split])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DataNotFoundError(f"{img_path}: expected N x H x W images, found shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataNotFoundError(f"{lbl_path}: expected {len(images)} labels, found shape {labels.shape}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class MNISTDataModule(ImageDataModule):
    """MNIST from the four idx files under ``root`` (``.gz`` or raw). 28x28 grey, 10 classes."""

    num_classes = 10
    in_channels = 1
    native_size = 28
    mean = (0.1307,)
    std = (0.3081,)
    hflip = False
    default_root: str | None = None

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(root=root if root is not None else self.default_root, **kwargs)

    def build_dataset(self, split: Split) -> Dataset:
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder with the four idx files>")
        images, labels = load_mnist_split(self.root, split)
        bad = ((labels < 0) | (labels >= self.num_classes)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            path = find_idx_file(Path(self.root), _FILES[split][1])
            raise DataNotFoundError(
                f"{path}: label {int(labels[i])} of sample {i} is outside the classes 0..{self.num_classes - 1} "
                f"of {type(self).__name__} ({len(bad)} such label(s))"
            )
        return TensorDataset(images, labels)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Zalando): 70k 28x28 grey images of clothing in 10 classes.

    ``root`` defaults to ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
    """

    mean = (0.2860,)
    std = (0.3530,)
    hflip = True
    default_root = FASHION_MNIST_DEBIAN_ROOT
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
