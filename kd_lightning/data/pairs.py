"""Class-wise pairs for CS-KD (Yun et al. 2020): every training sample comes with another of its class.

:class:`ClassPairSampler` is a :class:`~kd_lightning.data.sampler.ResumableSampler` whose items are
``(i, j)`` position pairs, ``j`` drawn uniformly among the other training samples of ``i``'s class.
The partners of an epoch are a pure function of ``(seed, epoch)``, like the order itself, so a run
resumed mid-epoch draws the same pairs as the uninterrupted one (nothing extra to checkpoint).
:class:`PairedDataset` turns an ``(i, j)`` item into the usual batch dict plus ``pair_image``,
``pair_label`` and ``pair_index``. ``ImageDataModule(class_pairs=True)`` wires both in.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

import torch
from torch.utils.data import Dataset

from kd_lightning.data.sampler import ResumableSampler
from kd_lightning.data.utils import dataset_len
from kd_lightning.errors import ConfigError

#: offset of the partner generator's seed, so partners do not correlate with the order
_PAIR_SEED_OFFSET = 7_919


class ClassPairSampler(ResumableSampler):
    """Seeded, resumable order of ``(i, j)`` pairs with ``labels[j] == labels[i]`` and ``j != i``.

    A sample alone in its class is paired with itself.

    Args:
        data_source: the training dataset (positions ``0..len-1``).
        labels: class of every position (length ``len(data_source)``).
        **kwargs: see :class:`~kd_lightning.data.sampler.ResumableSampler`.
    """

    def __init__(self, data_source: Sized, labels: Sequence[int] | torch.Tensor, **kwargs: Any) -> None:
        super().__init__(data_source, **kwargs)
        labels = torch.as_tensor(labels).long().flatten()
        if len(labels) != len(data_source):
            raise ConfigError(f"{len(labels)} labels for a training set of {len(data_source)} samples")
        self.labels = labels
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        self._by_class = order  # positions grouped by class
        self._start_of = torch.cumsum(counts, 0) - counts  # first slot of each class in _by_class
        self._count_of = counts
        self._rank_in_class = torch.empty_like(order)
        self._rank_in_class[order] = torch.arange(len(order)) - self._start_of[labels[order]]

    def partners(self, epoch: int) -> torch.Tensor:
        """The partner of every position for ``epoch`` (a function of ``(seed, epoch)`` only)."""
        g = torch.Generator().manual_seed(self.seed + epoch + _PAIR_SEED_OFFSET)
        count = self._count_of[self.labels]
        # draw among the other members of the class: a slot in [0, count - 1), shifted past oneself
        slot = (torch.rand(len(self.labels), generator=g) * (count - 1).clamp(min=1)).long()
        slot = torch.where(slot >= self._rank_in_class, slot + 1, slot)
        slot = torch.where(count > 1, slot, self._rank_in_class)
        return self._by_class[self._start_of[self.labels] + slot]

    def permutation(self, epoch: int) -> list[tuple[int, int]]:  # type: ignore[override]
        partners = self.partners(epoch).tolist()
        return [(i, partners[i]) for i in super().permutation(epoch)]


class PairedDataset(Dataset):
    """Serve ``(i, j)`` items of :class:`ClassPairSampler` as one batch dict with the partner's fields."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return dataset_len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if not isinstance(key, tuple):
            return self.base[key]
        i, j = key
        item, pair = dict(self.base[i]), self.base[j]
        item.update(pair_image=pair["image"], pair_label=pair["label"], pair_index=pair["index"])
        return item


__all__ = ["ClassPairSampler", "PairedDataset"]
