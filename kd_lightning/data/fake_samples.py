"""Generated samples as datasets: a finished store's samples, a class-balanced subset, indexed uint8 images.

The DataModules over generated samples (:mod:`kd_lightning.data.generated`) build on these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_lightning.errors import ConfigError


class FakeDataset(Dataset):
    """uint8 images and labels as ``{"image", "label", "index"}`` with ``index = offset + i``."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], torch.Tensor], offset: int = 0
    ) -> None:
        self.images, self.labels, self.transform, self.offset = images, labels, transform, offset
        self.targets = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.transform(self.images[i]), "label": self.labels[i], "index": self.offset + i}


def store_samples(
    path: str,
    filtered: bool = True,
    replaced: bool = True,
    expect_subsampled: bool | None = None,
    relabel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, Any]:
    """(uint8 images, labels, row numbers in the store's table, the store) of a finished store.

    ``filtered`` keeps the samples the filter kept (else every accepted one); ``replaced`` uses the
    final labels (teacher's where replaced) instead of the assigned ones; ``relabel`` gives every sample
    the filtering teacher's label (its argmax; a regressor's prediction in [0, 1]), whatever the store's
    replacement setting: the official cGAN-KD classification scripts read such a store (``adjust_True``)
    while the paper relabels only for regression.
    """
    from kd_lightning.sampling.store import open_store

    store = open_store(path)
    s = store.settings
    if expect_subsampled is not None and bool(s["subsample"]) != expect_subsampled:
        raise ConfigError(
            f"store {path!r} was written with subsample={s['subsample']} but subsampled={expect_subsampled} "
            "was asked; generate a store with the processing you want"
        )
    if filtered and not s["filter"]:
        raise ConfigError(f"store {path!r} was written with filter=false; set filtered false or regenerate it")
    table = store.table()
    select = table["kept"] if filtered else table["accepted"]
    rows = np.nonzero(select.astype(bool))[0]
    images = torch.from_numpy(store.load_images()[rows])
    if relabel:
        if "teacher" not in table.columns:
            raise ConfigError(
                f"store {path!r} holds no teacher outputs (written without a teacher); relabel needs them"
            )
        t = table["teacher"][rows]
        relabelled = t.argmax(1) if s["task"] == "classification" else np.clip(t.reshape(-1), 0, 1)
        labels = torch.from_numpy(relabelled.astype(table["label"].dtype))
    else:
        labels = torch.from_numpy(table["final_label" if replaced else "label"][rows])
    return images, labels, rows, store


def balanced_prefix(labels: torch.Tensor, n: int, seed: int, by_class: bool = True) -> torch.Tensor:
    """Exactly ``n`` sorted row numbers, a seeded draw in which every class keeps its share (up to one sample).

    Each class's rows are shuffled and ranked at ``(rank + 0.5) / class size``; the ``n`` lowest ranks
    are taken, so any ``n`` follows the class proportions and a smaller ``n`` is a subset of a larger one.
    """
    g = torch.Generator().manual_seed(seed)
    key = torch.empty(len(labels), dtype=torch.float64)
    groups = labels.unique() if by_class else torch.zeros(1)
    for c in groups:
        rows = (labels == c).nonzero().flatten() if by_class else torch.arange(len(labels))
        rank = torch.empty(len(rows), dtype=torch.float64)
        rank[torch.randperm(len(rows), generator=g)] = torch.arange(len(rows), dtype=torch.float64)
        key[rows] = (rank + 0.5) / len(rows)
    return torch.sort(torch.argsort(key, stable=True)[:n]).values


def store_labels(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Labels as a batch carries them: int64 classes, float32 regression values."""
    return labels.long() if task == "classification" else labels.float()


__all__ = ["FakeDataset", "balanced_prefix", "store_labels", "store_samples"]
