"""SVHN and Synthetic Digits: 32x32 colour digits in the SVHN "cropped digits" ``.mat`` format (MEKD, Table 6).

SVHN (Netzer et al., 2011), files as downloaded from http://ufldl.stanford.edu/housenumbers/::

    <root>/train_32x32.mat     X: 32 x 32 x 3 x 73,257 uint8, y: 73,257 x 1 with labels 1..10 (10 = digit 0)
    <root>/test_32x32.mat      26,032 images
    <root>/extra_32x32.mat     531,131 easier images (only with ``extra=True``)

Synthetic Digits (SynNumbers, Ganin & Lempitsky, 2015), Ganin's own release in the same format::

    <root>/synth_train_32x32.mat   X: 32 x 32 x 3 x 479,400 uint8, y: 479,400 x 1
    <root>/synth_test_32x32.mat    9,553 images

or, when those are absent, the PyTorch re-pack that MEKD's official code downloads (liyxi/synthetic-digits,
``synth_{train,test}.pt.gz`` extracted; each a saved ``(images N x 32 x 32 x 3 uint8, labels N)`` pair)::

    <root>/synth_train.pt, synth_test.pt      (or <root>/SyntheticDigits/processed/synth_*.pt)

Label 10 is mapped to 0 in both (SVHN stores the digit 0 as 10), so class ``k`` is the digit ``k``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split, TensorDataset
from kd_lightning.data.matfile import mat_labels, read_mat
from kd_lightning.errors import DataNotFoundError


def read_svhn_mat(path: str | os.PathLike, what: str = "SVHN file") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 N x 3 x 32 x 32) and labels (int64 0..9, 10 mapped to 0) of one SVHN-format ``.mat``."""
    path = Path(path)
    d = read_mat(path, ("X", "y"), what)
    x = d["X"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataNotFoundError(f"{str(path)!r}: X has shape {x.shape} {x.dtype}; expected 32 x 32 x 3 x N uint8")
    labels = mat_labels(d["y"], path, "labels (y)", count=x.shape[3])
    labels[labels == 10] = 0
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataNotFoundError(f"{str(path)!r}: labels span [{labels.min()}, {labels.max()}]; expected 1..10 or 0..9")
    # H x W x C x N -> N x C x H x W as a view: loadmat returns MATLAB's column-major array, in which every
    # image is one contiguous block already, so no copy of the (up to 1.6 GB) array is made
    return torch.from_numpy(x).permute(3, 2, 0, 1), torch.from_numpy(labels)


class SVHNDataModule(ImageDataModule):
    """SVHN cropped digits: 73,257 training and 26,032 test 32x32 colour images of house-number digits.

    Args:
        root: folder holding ``train_32x32.mat`` and ``test_32x32.mat`` (and ``extra_32x32.mat``).
        extra: add the 531,131 ``extra`` images to the training split.
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    num_classes = 10
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)
    hflip = False  # digits are not mirror-symmetric
    name = "SVHN"
    files: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}
    extra_file = "extra_32x32.mat"

    def __init__(self, root: str | None = None, extra: bool = False, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.extra = extra

    def _files(self, split: Split) -> list[Path]:
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder holding {self.files['train'][0]}>")
        root = Path(self.root)
        if not root.is_dir():
            expected = ", ".join(self.files["train"] + self.files["test"])
            raise DataNotFoundError(f"{self.name} not found: root={str(root)!r} does not exist; expected {expected}")
        names = self.files[split] + ((self.extra_file,) if split == "train" and self.extra else ())
        return [root / n for n in names]

    def build_dataset(self, split: Split) -> Dataset:
        parts = [read_svhn_mat(p, f"{self.name} {split} file") for p in self._files(split)]
        if len(parts) == 1:
            return TensorDataset(*parts[0])
        return TensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def read_torch_digits(path: str | os.PathLike, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 N x 3 x 32 x 32) and labels (int64 0..9) of a saved ``(images N x 32 x 32 x 3, labels)`` pair."""
    path = Path(path)
    expected = "a torch.save'd pair (uint8 images N x 32 x 32 x 3, labels N)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise DataNotFoundError(
            f"{what}: {str(path)!r} is corrupt or truncated ({type(e).__name__}); expected {expected}"
        ) from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise DataNotFoundError(f"{what}: {str(path)!r} holds {type(obj).__name__}; expected {expected}")
    images, labels = obj
    if images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 3) or images.dtype != torch.uint8:
        raise DataNotFoundError(
            f"{what}: {str(path)!r} images are {tuple(images.shape)} {images.dtype}; expected {expected}"
        )
    labels = mat_labels(labels.numpy(), path, "labels", count=len(images))
    labels[labels == 10] = 0
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataNotFoundError(f"{str(path)!r}: labels span [{labels.min()}, {labels.max()}]; expected 0..9")
    return images.permute(0, 3, 1, 2), torch.from_numpy(labels)


class SynDigitsDataModule(SVHNDataModule):
    """Synthetic Digits (SynNumbers): ~480k rendered 32x32 digits.

    Ganin's ``synth_*_32x32.mat`` release, or, when it is absent, the ``synth_*.pt`` re-pack that MEKD's
    official code reads.

    MEKD's out-of-domain setting trains the teacher here and distils a student on SVHN. Normalisation
    constants are nominal (0.5 / 0.25), not measured on the release.
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    name = "Synthetic Digits"
    files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("synth_train_32x32.mat",),
        "test": ("synth_test_32x32.mat",),
    }
    torch_files: ClassVar[dict[str, str]] = {"train": "synth_train.pt", "test": "synth_test.pt"}

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(root=root, extra=False, **kwargs)

    def build_dataset(self, split: Split) -> Dataset:
        (mat,) = self._files(split)
        if mat.is_file():
            return super().build_dataset(split)
        name = self.torch_files[split]
        for pt in (mat.parent / name, mat.parent / "SyntheticDigits" / "processed" / name):
            if pt.is_file():
                return TensorDataset(*read_torch_digits(pt, f"{self.name} {split} file"))
        raise DataNotFoundError(
            f"{self.name} {split} split not found under root={str(mat.parent)!r}: expected {mat.name} (Ganin's .mat "
            f"release) or {name} (the re-pack MEKD's code reads, also under SyntheticDigits/processed/)"
        )
