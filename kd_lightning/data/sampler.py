"""A training sampler and loader that can be checkpointed mid-epoch and resumed exactly.

The order of an epoch is a pure function of ``(seed, epoch)`` (a seeded permutation, sharded by rank
like :class:`~torch.utils.data.DistributedSampler`), so a resumed run only has to know the epoch and
how many samples of it were already consumed. :class:`ResumableDataLoader` counts the batches it
hands out and exposes ``state_dict``/``load_state_dict``; Lightning saves the state of every such
("stateful") training loader in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and
gives it back before iteration restarts, after which the sampler skips what was already trained on.

Under DDP the sampler is a ``DistributedSampler`` subclass built with the trainer's world size and
rank, so Lightning keeps it instead of swapping in its own (``use_distributed_sampler`` stays on for
the evaluation loaders). Positions are stored per rank and are identical on every rank, so the
rank-0 checkpoint restores all ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kd_lightning.errors import CheckpointError, ConfigError


class ResumableSampler(DistributedSampler):
    """Seeded shuffling whose order depends only on ``(seed, epoch)`` and which can start mid-epoch.

    Args:
        data_source: the dataset (only its length is used).
        seed: seed of the permutation; epoch ``e`` uses ``seed + e``.
        shuffle: permute (training) or keep the dataset order.
        num_replicas: number of ranks sharing the epoch (1 without DDP).
        rank: this process's rank; it takes every ``num_replicas``-th index starting at ``rank``.
        drop_last: drop the tail so every rank gets the same number of samples (else pad by
            repeating the start of the permutation, like ``DistributedSampler``).
    """

    def __init__(
        self,
        data_source: Sized,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            cast(Dataset, data_source),  # DistributedSampler only takes its len()
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._start = 0  # samples of this rank's share of ``self.epoch`` to skip on the next iteration

    @property
    def dataset_size(self) -> int:
        """Length of ``data_source`` (a ``Sized``, which ``DistributedSampler`` stores as ``self.dataset``)."""
        return len(cast(Sized, self.dataset))

    def permutation(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch`` in the order they are drawn (without any skipping)."""
        n = self.dataset_size
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / max(1, len(order))))[:pad]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.permutation(self.epoch)[start:])

    def __len__(self) -> int:
        # the full share of an epoch even when resuming: Lightning counts the skipped batches as done
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a pending mid-epoch start only survives for the epoch it was saved in."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """The resumable state after ``consumed`` samples of this rank's share of the current epoch."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": consumed,
            "num_replicas": self.num_replicas,
            "num_samples": self.num_samples,
            "dataset_size": self.dataset_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved epoch and position (rescaled when the number of ranks changed)."""
        size = self.dataset_size
        if state["dataset_size"] != size:
            raise CheckpointError(
                f"the checkpoint's training set has {state['dataset_size']} samples but this "
                f"run's has {size}; resume with the same data (or start a new run)"
            )
        if state["seed"] != self.seed:
            warnings.warn(
                f"resuming with shuffle seed {self.seed} but the checkpoint used {state['seed']}; "
                "the order of later epochs will differ",
                stacklevel=2,
            )
        consumed = int(state["consumed"])
        if state["num_replicas"] != self.num_replicas:
            # same global number of samples seen, spread over the new number of ranks (approximate)
            consumed = (consumed * int(state["num_replicas"])) // self.num_replicas
            warnings.warn(
                f"resuming on {self.num_replicas} ranks from a checkpoint of {state['num_replicas']}: "
                "the rest of the interrupted epoch is re-sharded, so resumption is not exact",
                stacklevel=2,
            )
        self.epoch = int(state["epoch"])
        self._start = min(consumed, self.num_samples)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that Lightning checkpoints mid-epoch.

    It counts the batches handed out in the current pass; ``state_dict()`` turns that into the
    sampler position (batches are consecutive runs of ``batch_size`` indices of the sampler's order).
    The count is exact because Lightning does not prefetch from loaders with a length.
    """

    def __init__(self, dataset: Dataset, sampler: Sampler | Iterable | None = None, **kwargs: Any) -> None:
        # Lightning may rebuild the loader with another sampler (``overfit_batches``): then it is a plain loader
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch_start = 0  # sampler position where the current pass began
        self._batches = 0  # batches handed out in the current pass

    @property
    def resumable(self) -> bool:
        return isinstance(self.sampler, ResumableSampler)

    # a generator that counts the batches, not a ``_BaseDataLoaderIter``: Lightning only iterates it
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # the body runs at the first ``next`` (after Lightning's ``set_epoch``), not at ``iter``
        self._epoch_start, self._batches = getattr(self.sampler, "_start", 0), 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):  # not ``resumable``
            return {}
        consumed = min(self._epoch_start + self._batches * (self.batch_size or 1), sampler.num_samples)
        return {"sampler": sampler.state_dict(consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.sampler, ResumableSampler) and state.get("sampler"):  # ``resumable``
            self.sampler.load_state_dict(state["sampler"])
        self._epoch_start, self._batches = 0, 0


class ShareSampler(ResumableSampler):
    """Batches of ``batch_size`` with ``round(share x batch_size)`` fake positions each (indices >= n_real).

    The order is a function of ``(seed, epoch)`` like :class:`ResumableSampler`, so a resumed run
    continues mid-epoch exactly. An epoch is one pass over the real samples (full batches only);
    fakes follow a seeded permutation that continues across epochs.
    """

    def __init__(self, n_real: int, n_fake: int, batch_size: int, share: float, seed: int) -> None:
        self.n_real, self.n_fake, self.bs = n_real, n_fake, batch_size
        self.k_fake = min(batch_size - 1, max(1, round(share * batch_size)))
        self.k_real = batch_size - self.k_fake
        if n_fake == 0:
            raise ConfigError("fake_share is set but the store gives no fake samples")
        self.n_batches = max(1, n_real // self.k_real)
        super().__init__(range(self.n_batches * batch_size), seed=seed, shuffle=True)

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        real = torch.randperm(self.n_real, generator=g)
        need = self.n_batches * self.k_fake
        start = epoch * need
        passes = math.ceil((start + need) / self.n_fake) + 1
        fake_stream = torch.cat(
            [
                torch.randperm(self.n_fake, generator=torch.Generator().manual_seed(self.seed * 7919 + p))
                for p in range(start // self.n_fake, passes)
            ]
        )
        offset = start - (start // self.n_fake) * self.n_fake
        fake = fake_stream[offset : offset + need] + self.n_real
        order: list[int] = []
        for b in range(self.n_batches):
            order += real[b * self.k_real : (b + 1) * self.k_real].tolist()
            order += fake[b * self.k_fake : (b + 1) * self.k_fake].tolist()
        return order


__all__ = ["ResumableDataLoader", "ResumableSampler", "ShareSampler"]
