"""Shared fixtures: fake on-disk datasets and an in-process ``kdl`` runner."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.cli import main as kdl_main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
#: command-line arguments for a quiet in-process ``kdl`` run (no logger files, no progress bar, no summary)
QUIET_TRAINER = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    torch.manual_seed(0)
    yield


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as an idx file (gzipped when ``path`` ends in .gz)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fake_mnist(root: Path, n_train: int = 120, n_test: int = 40, size: int = 28, gz: bool = True) -> Path:
    """Four MNIST-format idx files with class-dependent images (learnable, 10 classes)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
        for i, y in enumerate(labels):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * y : 4 + 2 * y, 4:-4] = 250
        write_idx(root / f"{split}-images-idx3-ubyte{sfx}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{sfx}", labels)
    return root


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    return make_fake_mnist(tmp_path / "fmnist")


@pytest.fixture
def kdl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run ``kdl`` in-process inside ``tmp_path``; returns the exit status."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> int:
        try:
            return kdl_main(list(args))
        except SystemExit as e:  # jsonargparse exits on parse errors / --help
            return int(e.code or 0)

    return run


@pytest.fixture
def kdl_callbacks(monkeypatch: pytest.MonkeyPatch) -> list:
    """A list whose callbacks every in-process ``kdl`` run of the test gets first (fill or clear it between runs)."""
    import kd_lightning.cli as cli

    extra: list = []
    original = cli.KDLCLI.after_instantiate_classes

    def with_extra(self) -> None:  # noqa: ANN001
        original(self)
        self.trainer.callbacks[:0] = extra

    monkeypatch.setattr(cli.KDLCLI, "after_instantiate_classes", with_extra)
    return extra
