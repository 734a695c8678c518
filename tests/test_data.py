"""Loaders: MNIST-format idx files, digits, splits, subsets, batch format, clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import DigitsDataModule, FashionMNISTDataModule, MNISTDataModule, load_mnist_split, read_idx
from kd_lightning.errors import DataNotFoundError
from tests.helpers import make_fake_mnist, write_idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx" + (".gz" if gz else ""))
    write_idx(path, arr)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_mnist_split_matches_files(tmp_path: Path) -> None:
    root = make_fake_mnist(tmp_path / "m", n_train=30, n_test=20, gz=False)
    images, labels = load_mnist_split(root, "train")
    assert images.shape == (30, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(30)]
    raw = read_idx(root / "train-images-idx3-ubyte")
    assert torch.equal(images[:, 0], torch.from_numpy(raw.copy()))
    assert load_mnist_split(root, "test")[0].shape == (20, 1, 28, 28)


def test_missing_root_names_path() -> None:
    dm = FashionMNISTDataModule(root="/does/not/exist")
    with pytest.raises(DataNotFoundError, match="/does/not/exist"):
        dm.setup("fit")


def test_missing_file_names_expected_files(tmp_path: Path) -> None:
    root = make_fake_mnist(tmp_path / "m")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        MNISTDataModule(root=str(root)).setup("test")


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    root = make_fake_mnist(tmp_path / "m", gz=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataNotFoundError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataNotFoundError, match="not an idx file"):
        read_idx(path)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(DataNotFoundError, match="cannot read"):
        read_idx(bad_gz)
    gz_ok = tmp_path / "empty.gz"
    with gzip.open(gz_ok, "wb"):
        pass
    with pytest.raises(DataNotFoundError):
        read_idx(gz_ok)


def test_digits_splits_are_disjoint_stratified_and_seeded() -> None:
    dm = DigitsDataModule(val_fraction=0.2, seed=3)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.test_dataset) == 355  # 20% of each class, rounded down
    train_idx, val_idx = set(dm.train_dataset.indices), set(dm.val_dataset.indices)
    assert not train_idx & val_idx
    assert len(train_idx) + len(val_idx) == 1797 - 355
    again = DigitsDataModule(val_fraction=0.2, seed=3)
    again.setup("fit")
    assert again.val_dataset.indices == dm.val_dataset.indices
    other = DigitsDataModule(val_fraction=0.2, seed=4)
    other.setup("fit")
    assert other.val_dataset.indices != dm.val_dataset.indices


def test_train_size_keeps_class_proportions() -> None:
    dm = DigitsDataModule(train_size=500, seed=0)
    dm.setup("fit")
    base = dm.train_dataset.dataset.base
    labels = base.labels[dm.train_dataset.indices]
    assert len(labels) == 500
    counts = torch.bincount(labels, minlength=10).float()
    assert counts.min() >= 45 and counts.max() <= 55


@pytest.mark.parametrize("size", [10, 11, 99, 128, 500, 9_999, 10_000, 10_001, 53_999])
def test_a_stratified_subset_has_exactly_the_size_asked(size: int) -> None:
    """Per-class rounding gave 9,999 for 10,000 of Fashion-MNIST's 54,000 training images; the subset is exact."""
    from kd_lightning.data.base import stratified_subset

    labels = torch.arange(54_000) % 10  # Fashion-MNIST after the validation split: 5,400 a class
    labels[:7] = 3  # and a little uneven, so that shares have remainders
    out = stratified_subset(labels, size, torch.Generator().manual_seed(0))
    assert len(out) == size == len(out.unique())
    counts, shares = torch.bincount(labels[out], minlength=10), size * torch.bincount(labels) / len(labels)
    assert ((counts - shares).abs() < 1).all()  # every class within one sample of its share
    again = stratified_subset(labels, size, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded


def test_a_stratified_subset_below_the_number_of_classes_is_refused() -> None:
    from kd_lightning.data.base import stratified_subset
    from kd_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train_size=5 is below the 10 classes"):
        stratified_subset(torch.arange(100) % 10, 5, torch.Generator().manual_seed(0))


def test_batch_format_index_and_padding() -> None:
    dm = DigitsDataModule(image_size=16, augment=False, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    x, y, idx = batch["image"], batch["label"], batch["index"]
    assert x.shape == (8, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert y.dtype == torch.int64
    base = dm.train_dataset.dataset.base
    for i in range(8):  # the index points at the very sample in the underlying set
        img, label = base[int(idx[i])]
        assert int(label) == int(y[i])
        assert torch.allclose(x[i, :, 4:12, 4:12], img.float() / 255.0)
    assert x[:, :, :4].abs().sum() == 0  # zero padding around the 8x8 digit


def test_augmentation_changes_training_images_only() -> None:
    dm = DigitsDataModule(image_size=16, augment=True, batch_size=64)
    dm.setup("fit")
    i = dm.train_dataset.indices[0]
    views = torch.stack([dm.train_dataset.dataset[i]["image"] for _ in range(10)])
    assert (views - views[0]).abs().sum() > 0  # random crops differ
    j = dm.val_dataset.indices[0]
    assert torch.equal(dm.val_dataset.dataset[j]["image"], dm.val_dataset.dataset[j]["image"])
