"""Data for black-box distillation: the edge's local images held apart from the cloud's, and query pools.

- :class:`EdgeCloudSplit` (mixed into a dataset's DataModule, e.g. :class:`FashionMNISTEdgeCloud`) cuts the
  official training split, with a fixed seed, into disjoint parts: the *cloud* part trains the teacher; the *edge*
  part is the student side's ``edge_size`` local images (used unlabelled) plus ``edge_val_size`` labelled
  images for model selection. The official test split is the test set of both.
- :class:`QueryPoolDataModule` serves a fixed, deterministic pool of query items, so that a query budget is a
  pool size: ``pool="latent"`` gives ``pool_size`` latent codes z ~ N(0, I) (MEKD: x' = G(z)); ``pool="local"``
  gives the edge images, view 0 as they are and views 1.. as deterministic random crops/flips, ``pool_size`` items
  in all. Each epoch walks the pool; a teacher answer is paid once and read from the journal afterwards.
  Training batches carry no label (``{"z" | "image", "index"}``); validation and test batches come, labelled,
  from the wrapped DataModule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.base import ImageDataModule, augments, dataset_len, default_num_workers
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.mnist import FashionMNISTDataModule
from kd_lightning.errors import ConfigError

Part = Literal["cloud", "edge"]


class EdgeCloudSplit:
    """Mixin: train/val indices from a fixed cloud/edge partition of the training split (see the module doc).

    Args:
        part: ``"cloud"`` (the teacher's data; validation carved by ``val_fraction``) or ``"edge"`` (the
            student side's ``edge_size`` images; validation = ``edge_val_size`` further images).
        edge_size: images on the edge.
        edge_val_size: labelled edge images for model selection only.
        partition_seed: seed of the partition (the same for every stage of a run).
        **kwargs: the dataset's DataModule arguments.
    """

    seed: int  # set by the ImageDataModule this is mixed into
    val_fraction: float

    def __init__(
        self,
        part: Part = "edge",
        edge_size: int = 10_000,
        edge_val_size: int = 2_000,
        partition_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if part not in ("cloud", "edge"):
            raise ConfigError(f"part={part!r}; expected 'cloud' or 'edge'")
        if edge_size < 1 or edge_val_size < 0:
            raise ConfigError(f"edge_size={edge_size}, edge_val_size={edge_val_size}; expected >= 1 and >= 0")
        self.part, self.edge_size, self.edge_val_size, self.partition_seed = (
            part,
            edge_size,
            edge_val_size,
            partition_seed,
        )
        super().__init__(**kwargs)

    def partition(self, n: int) -> dict[str, torch.Tensor]:
        """Sorted indices of ``edge``, ``edge_val`` and ``cloud`` in a training split of ``n`` images."""
        if self.edge_size + self.edge_val_size >= n:
            raise ConfigError(
                f"edge_size={self.edge_size} + edge_val_size={self.edge_val_size} leave no cloud images out of {n}"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.partition_seed))
        e, v = self.edge_size, self.edge_size + self.edge_val_size
        return {"edge": perm[:e].sort().values, "edge_val": perm[e:v].sort().values, "cloud": perm[v:].sort().values}

    def _split_indices(self, base: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.partition(dataset_len(base))
        if self.part == "edge":
            return parts["edge"], parts["edge_val"]
        cloud = parts["cloud"]
        g = torch.Generator().manual_seed(self.seed)
        perm = cloud[torch.randperm(len(cloud), generator=g)]
        n_val = round(self.val_fraction * len(cloud))
        return perm[n_val:].sort().values, perm[:n_val].sort().values


class FashionMNISTEdgeCloud(EdgeCloudSplit, FashionMNISTDataModule):
    """Fashion-MNIST cut into the teacher's (cloud) part and the student side's (edge) part."""


class DigitsEdgeCloud(EdgeCloudSplit, DigitsDataModule):
    """scikit-learn digits cut into cloud and edge parts (tests and quick examples)."""

    def __init__(self, edge_size: int = 400, edge_val_size: int = 100, **kwargs: Any) -> None:
        super().__init__(edge_size=edge_size, edge_val_size=edge_val_size, **kwargs)


def spent_queries(sources: list[str] | None) -> int:
    """Teacher queries paid by earlier stages: the sum of ``journal_spent`` in each source's ``queries/stats.json``.

    A source is a run folder or the stats file itself. A missing or unreadable file is an error (a budget that
    silently ignored stage 1 would overspend).
    """
    total = 0
    for src in sources or []:
        path = Path(src)
        if path.is_dir():
            path = path / "queries" / "stats.json"
        try:
            total += int(json.loads(path.read_text())["journal_spent"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"spent_before: {str(src)!r} gives no queries/stats.json with journal_spent ({type(e).__name__}); "
                "expected an earlier black-box stage's run folder or its stats.json"
            ) from None
    return total


class _LatentPool(Dataset):
    def __init__(self, size: int, z_dim: int, seed: int) -> None:
        self.z = torch.randn(size, z_dim, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"z": self.z[i], "index": i}


class _ViewPool(Dataset):
    """Item j = view ``j // n`` of local image ``j % n``: view 0 unchanged, others a seeded crop (and flip)."""

    def __init__(self, images: Dataset, size: int, seed: int, hflip: bool) -> None:
        self.images, self.size, self.seed, self.hflip = images, size, seed, hflip

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict[str, Any]:
        n = dataset_len(self.images)
        x = self.images[j % n]["image"]
        view = j // n
        if view:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
            pad = max(1, x.shape[-1] // 8)
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
            x = padded[:, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
            if self.hflip and bool(torch.randint(0, 2, (1,), generator=g)):
                x = x.flip(-1)
        return {"image": x, "index": j}


class QueryPoolDataModule(L.LightningDataModule):
    """A fixed pool of query items for training (no labels), the wrapped DataModule's labelled val/test.

    Args:
        local: the edge's DataModule (e.g. :class:`FashionMNISTEdgeCloud` with ``part: edge``); its
            training images are the local pool (never their labels), its val/test splits evaluate.
        pool: ``"latent"`` (z ~ N(0, I), ``z_dim`` numbers each) or ``"local"`` (views of the local images).
        pool_size: items in the pool = the most distinct queries training can make (the query budget).
        z_dim: latent size (``None``: the number of classes, as MEKD's generator takes).
        batch_size: training batch size.
        seed: seed of the pool (latent codes, crop offsets) and of the shuffling.
        spent_before: earlier stages (run folders or their ``queries/stats.json``) whose paid queries come off
            ``pool_size``: with ``pool_size`` = the method's whole budget, the pool is what stage 1 left.
    """

    label_range = None
    task = "classification"
    num_classes: int | None  # copied from ``local`` with the other dataset facts

    def __init__(
        self,
        local: ImageDataModule,
        pool: Literal["latent", "local"] = "latent",
        pool_size: int = 10_000,
        z_dim: int | None = None,
        batch_size: int = 128,
        seed: int = 0,
        spent_before: list[str] | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("latent", "local"):
            raise ConfigError(f"pool={pool!r}; expected 'latent' or 'local'")
        if pool_size < 1 or batch_size < 1:
            raise ConfigError(f"pool_size={pool_size}, batch_size={batch_size}; expected positive integers")
        if pool == "local" and augments(local):
            raise ConfigError(
                "pool='local' makes its own deterministic views; set the local DataModule's augment: false "
                "(random augmentation would make every epoch pay for new images)"
            )
        self.local, self.pool, self.pool_size, self.seed = local, pool, pool_size, seed
        self.batch_size = batch_size
        self.z_dim = z_dim
        self.spent_before = list(spent_before or [])
        for key in ("num_classes", "in_channels", "image_size", "mean", "std"):
            setattr(self, key, getattr(local, key))
        self.train_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        self.local.trainer = getattr(self, "trainer", None)
        self.local.setup(stage)
        if stage in ("fit", None) and self.train_dataset is None:
            spent = spent_queries(self.spent_before)
            if spent:
                if spent >= self.pool_size:
                    raise ConfigError(
                        f"pool_size={self.pool_size} but the earlier stages {self.spent_before} already spent {spent} "
                        "queries: nothing is left for this one"
                    )
                self.pool_size -= spent
            if self.pool == "latent":
                z_dim = self.z_dim or self.num_classes
                if z_dim is None:
                    raise ConfigError(f"z_dim=None and {type(self.local).__name__} has no num_classes to take")
                self.train_dataset = _LatentPool(self.pool_size, int(z_dim), self.seed)
            else:
                local_train = self.local.train_dataset
                if local_train is None:
                    raise RuntimeError(f"{type(self.local).__name__}.setup('fit') built no training set")
                self.train_dataset = _ViewPool(local_train, self.pool_size, self.seed, self.local.hflip)

    @property
    def num_local(self) -> int:
        ds = self.local.train_dataset
        return 0 if ds is None else dataset_len(ds)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("setup() has not built this split yet")
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.pool_size > self.batch_size,
            num_workers=default_num_workers(),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.local.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.local.test_dataloader()


__all__ = ["DigitsEdgeCloud", "EdgeCloudSplit", "FashionMNISTEdgeCloud", "QueryPoolDataModule", "spent_queries"]
