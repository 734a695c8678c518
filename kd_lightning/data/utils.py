"""Dataset helpers every DataModule uses, apart from the DataModule base (torchgeo keeps its ``utils`` apart too).

The sample wrappers (:class:`IndexedDataset`, :class:`TensorDataset`), a stratified subset, the length and
labels of any map-style dataset, and the size of a DataModule's index range (:func:`num_indices`).
:mod:`kd_lightning.data.base` re-exports the names that lived there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sized
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset, Subset

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
    "augments",
    "dataset_labels",
    "dataset_len",
    "default_num_workers",
    "num_indices",
    "stratified_subset",
]
