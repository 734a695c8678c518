"""CIFAR-10 and CIFAR-100 from the standard "python version" pickle batches.

Layout (as extracted from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``)::

    <root>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}
    <root>/cifar-100-python/{train, test}

``root`` may also point directly at the extracted folder. Each pickle is a dict with ``data``
(N x 3072 uint8, channel-major 32x32 RGB) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split, TensorDataset
from kd_lightning.errors import DataNotFoundError


def _get(d: dict, key: str) -> Any:  # noqa: ANN401 - an unpickled value
    return d[key.encode()] if key.encode() in d else d[key]


def read_cifar_batch(path: str | os.PathLike, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 3 x 32 x 32 uint8) and labels (int64) of one CIFAR pickle, with format checks."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"CIFAR batch file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data, labels = _get(d, "data"), _get(d, label_key)
    except (pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise DataNotFoundError(
            f"{str(path)!r} is not a CIFAR python batch ({type(e).__name__}: {e}); expected a pickled dict "
            f"with 'data' (N x 3072 uint8) and {label_key!r}"
        ) from None
    data, labels = np.asarray(data), np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataNotFoundError(f"{str(path)!r}: 'data' has shape {data.shape} {data.dtype}; expected N x 3072 uint8")
    if labels.shape != (len(data),):
        raise DataNotFoundError(f"{str(path)!r}: {labels.shape} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32x32 colour images in 10 classes."""

    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    folder = "cifar-10-batches-py"
    files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }
    label_key = "labels"

    def _folder(self) -> Path:
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder holding {self.folder}/>")
        root = Path(self.root)
        for cand in (root / self.folder, root):
            if (cand / self.files["test"][0]).is_file():
                return cand
        raise DataNotFoundError(
            f"CIFAR files not found under root={str(root)!r}; expected {root / self.folder}/"
            f"{{{', '.join(self.files['train'] + self.files['test'])}}} (the python version of the dataset)"
        )

    def build_dataset(self, split: Split) -> Dataset:
        folder = self._folder()
        parts = [read_cifar_batch(folder / name, self.label_key) for name in self.files[split]]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataNotFoundError(
                f"{folder}: labels span [{labels.min()}, {labels.max()}]; "
                f"expected class ids in [0, {self.num_classes - 1}]"
            )
        return TensorDataset(images, labels)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50,000 training and 10,000 test 32x32 colour images in 100 (fine) classes."""

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    folder = "cifar-100-python"
    files: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train",), "test": ("test",)}
    label_key = "fine_labels"
