"""Dataset helpers every DataModule uses, apart from the DataModule base (torchgeo keeps its ``utils`` apart too).

The sample wrappers (:class:`IndexedDataset`, :class:`TensorDataset`), the uint8 fast path of the training and
evaluation transforms (:class:`UInt8Transform`), a stratified subset, the length and labels of any map-style
dataset, and the size of a DataModule's index range (:func:`num_indices`).
:mod:`kd_lightning.data.base` re-exports the names that lived there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence, Sized
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from kd_lightning.errors import ConfigError


def default_num_workers() -> int:
    """No worker processes on <= 2 cores (they only steal the cores training needs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)


class IndexedDataset(Dataset):
    """Wrap a dataset of ``(image, label)`` pairs into dicts with the sample's index.

    ``transform`` maps the image (uint8 tensor C x H x W or PIL image) to a float tensor in [0, 1];
    ``target_transform`` maps the raw label (e.g. normalises a regression label).
    """

    def __init__(
        self,
        base: Dataset,
        transform: Callable[[Any], torch.Tensor],
        target_transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.base = base
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return dataset_len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.base[i]
        label = self.target_transform(label) if self.target_transform else torch.as_tensor(label)
        return {"image": self.transform(image), "label": label, "index": i}


class TensorDataset(Dataset):
    """In-memory images (uint8, N x C x H x W) and labels, as ``(image, label)`` pairs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.targets = labels  # torchvision's name, used for stratified subsets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class UInt8Transform:
    """Run v2's ToImage, Pad, RandomCrop(padding), RandomHorizontalFlip, ToDtype(float32, scale) without dispatch.

    It works on a plain uint8 tensor, without torchvision's per-call dispatch.

    The same operations, in the same order, with the same random draws from the global RNG (crop top, crop left,
    flip), so the outputs and the random stream are bitwise those of the v2 pipeline (checked in
    tests/test_fast_transforms.py) and fixed-seed runs and resumption are unchanged. The per-sample transform was
    4-7% of a ResNet-20 step (docs/performance.md). Anything else (PIL images, other ops) goes to the v2 pipeline.
    """

    def __init__(self, pipeline: v2.Compose, pad: list[int] | None, crop: tuple[int, int] | None, flip: bool) -> None:
        self.pipeline, self.pad, self.crop, self.flip = pipeline, pad, crop, flip

    @classmethod
    def from_ops(cls, pipeline: v2.Compose) -> Callable:
        """The fast form of ``pipeline`` when it has only the ops above (else ``pipeline`` itself)."""
        pad: list[int] | None = None
        crop: tuple[int, int] | None = None
        flip = False
        ops = list(pipeline.transforms)
        if not (ops and isinstance(ops[0], v2.ToImage) and isinstance(ops[-1], v2.ToDtype)):
            return pipeline
        if ops[-1].dtype not in (torch.float32, {"others": torch.float32}) or not ops[-1].scale:
            return pipeline
        for op in ops[1:-1]:
            if type(op) is v2.Pad and pad is None and crop is None and op.padding_mode == "constant" and op.fill == 0:
                left, top, right, bottom = _four(op.padding)
                pad = [left, right, top, bottom]
            elif type(op) is v2.RandomCrop and crop is None and not flip and _plain_crop(op):
                left, right, top, bottom = op.padding or (0, 0, 0, 0)
                crop = (op.size[0], op.size[1])
                pad = _add_pad(pad, [left, right, top, bottom])
            elif type(op) is v2.RandomHorizontalFlip and not flip and op.p == 0.5:
                flip = True
            else:
                return pipeline
        return cls(pipeline, pad, crop, flip)

    def __call__(self, image: object) -> torch.Tensor:
        if type(image) is not torch.Tensor or image.dtype != torch.uint8 or image.ndim != 3:
            return self.pipeline(image)
        x = image
        if self.pad is not None and any(self.pad):
            x = torch.nn.functional.pad(x, self.pad)
        if self.crop is not None:
            (ch, cw), (h, w) = self.crop, x.shape[-2:]
            if h < ch or w < cw:
                return self.pipeline(image)  # v2 raises its own error
            top = int(torch.randint(0, h - ch + 1, size=())) if h > ch else 0
            left = int(torch.randint(0, w - cw + 1, size=())) if w > cw else 0
            x = x[:, top : top + ch, left : left + cw]
        if self.flip and not bool(torch.rand(1) >= 0.5):
            x = x.flip(-1)
        return x.to(torch.float32).mul_(1.0 / 255)


def _four(padding: Sequence[int]) -> list[int]:
    p = list(padding)
    return p * 4 if len(p) == 1 else (p * 2 if len(p) == 2 else p)


def _plain_crop(op: v2.RandomCrop) -> bool:
    return not op.pad_if_needed and op.padding_mode == "constant" and op.fill in (0, {"others": 0}, None)


def _add_pad(pad: list[int] | None, more: list[int]) -> list[int]:
    return more if pad is None else [a + b for a, b in zip(pad, more)]


def stratified_subset(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a random subset of exactly ``size`` samples with class proportions kept (sorted).

    Each class gets the floor of its share of ``size``; the samples left over go to the classes with the
    largest remainders (ties broken at random), so the subset has ``size`` samples, not a per-class rounding
    of it. A ``size`` below the number of classes cannot keep every class and is refused.
    """
    labels = torch.as_tensor(labels)
    if size >= len(labels):
        return torch.arange(len(labels))
    if labels.is_floating_point():  # regression: plain random subset
        return torch.randperm(len(labels), generator=generator)[:size].sort().values
    classes = labels.unique()
    if size < len(classes):
        raise ConfigError(
            f"train_size={size} is below the {len(classes)} classes of the training set; a stratified subset "
            f"needs at least one sample per class (train_size >= {len(classes)})"
        )
    members = [(labels == c).nonzero().flatten() for c in classes]
    orders = [idx[torch.randperm(len(idx), generator=generator)] for idx in members]
    shares = torch.tensor([size * len(idx) / len(labels) for idx in members], dtype=torch.float64)
    counts = shares.floor().long()
    left = size - int(counts.sum())
    if left > 0:
        tie_break = torch.randperm(len(classes), generator=generator)
        by_remainder = sorted(range(len(classes)), key=lambda i: (-float(shares[i] - counts[i]), int(tie_break[i])))
        for i in by_remainder[:left]:
            counts[i] += 1
    out = torch.cat([order[: int(k)] for order, k in zip(orders, counts)])
    return out.sort().values


def augments(dm: object) -> bool:
    """Return whether ``dm`` shows a sample different images from epoch to epoch.

    That is its ``augment`` flag (a DataModule without one does not augment). Methods that cache per-sample
    outputs check this.
    """
    return bool(getattr(dm, "augment", False))


def dataset_len(ds: Dataset) -> int:
    """``len(ds)`` (torch's ``Dataset`` does not declare ``__len__``, though every map-style dataset here has one)."""
    if not isinstance(ds, Sized):
        raise ConfigError(f"{type(ds).__name__} has no __len__; expected a map-style dataset with a length")
    return len(ds)


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """Return every label of ``ds`` in order, as its samples carry them.

    A regression label is normalised by the ``IndexedDataset``'s ``target_transform``; class ids are as
    stored: call ``.long()`` for classes.

    Reads ``targets`` through ``Subset``, ``IndexedDataset`` and wrappers with a ``base`` without loading
    images; a dataset without ``targets`` is iterated.
    """
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, IndexedDataset):
        raw = dataset_labels(ds.base)
        return ds.target_transform(raw) if ds.target_transform else raw
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets)
    inner = getattr(ds, "base", None)
    if isinstance(inner, Dataset):
        return dataset_labels(inner)
    items = (ds[i] for i in range(dataset_len(ds)))
    return torch.stack([torch.as_tensor(x["label"] if isinstance(x, dict) else x[1]) for x in items])


def num_indices(dm: L.LightningDataModule) -> int:
    """Size of the range of ``batch["index"]`` in the training data (the DataModule may say it itself)."""
    given = getattr(dm, "num_train_indices", None)
    if given is not None:
        return int(given)
    ds: Dataset | None = getattr(dm, "train_dataset", None)
    while isinstance(ds, Subset):
        ds = ds.dataset
    if ds is None:
        raise ConfigError(f"{type(dm).__name__} has no train_dataset after setup; cannot size per-sample state")
    return dataset_len(ds)


__all__ = [
    "IndexedDataset",
    "TensorDataset",
    "UInt8Transform",
    "augments",
    "dataset_labels",
    "dataset_len",
    "default_num_workers",
    "num_indices",
    "stratified_subset",
]
