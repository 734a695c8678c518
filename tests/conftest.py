"""Shared fixtures: fake on-disk datasets and an in-process ``kdl`` runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.cli import main as kdl_main
from tests.helpers import REPO, cgankd_parts, make_fake_mnist

__all__ = ["REPO", "make_fake_mnist"]  # tests/test_notebooks.py imports them from here


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from torch's seed 0 (its thread count comes from OMP_NUM_THREADS, not from here)."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny cGAN, teacher and DR checkpoint on digits (tests/helpers.py ``cgankd_parts``), once per module."""
    return cgankd_parts(tmp_path_factory.mktemp("cgankd"))


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

    def with_extra(self) -> None:
        original(self)
        self.trainer.callbacks[:0] = extra

    monkeypatch.setattr(cli.KDLCLI, "after_instantiate_classes", with_extra)
    return extra
