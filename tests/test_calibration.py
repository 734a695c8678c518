"""Calibration: temperature scaling fitted on validation, ECE, the test report, reliability diagrams."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torchmetrics.functional.classification import multiclass_calibration_error

from kd_lightning.callbacks import TemperatureScaling
from kd_lightning.metrics.calibration import (
    calibration_report,
    classification_summary,
    fit_temperature,
    plot_reliability_diagram,
    reliability_bins,
)
from tests.helpers import QUIET, RECIPES


def overconfident(n: int, classes: int = 10, sharpen: float = 4.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model answers ``sharpen * z`` (calibrated only at T = sharpen)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(F.softmax(z, -1), 1, generator=g).squeeze(1)
    return sharpen * z, labels


def test_temperature_scaling_lowers_nll_and_ece_of_an_overconfident_model() -> None:
    val_logits, val_labels = overconfident(3000, seed=0)
    test_logits, test_labels = overconfident(3000, seed=1)
    t = fit_temperature(val_logits, val_labels)
    assert 3.0 < t < 5.0  # the sharpening factor is recovered from the validation split alone
    before = F.cross_entropy(test_logits, test_labels)
    after = F.cross_entropy(test_logits / t, test_labels)
    assert after < before - 0.5
    report = calibration_report(val_logits, val_labels, test_logits, test_labels)
    assert report["temperature"] == pytest.approx(t)
    assert report["nll_ts"] == pytest.approx(float(after), rel=1e-5)
    assert report["ece_ts"] < report["ece"] / 3
    assert report["top1_error"] == pytest.approx(classification_summary(test_logits / t, test_labels)["top1_error"])


def test_a_calibrated_model_keeps_temperature_near_one() -> None:
    logits, labels = overconfident(4000, sharpen=1.0, seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_summary_metrics_on_a_hand_made_example() -> None:
    logits = torch.full((4, 6), -5.0)
    # sample 0: correct; sample 1: label ranked 2nd; sample 2: label ranked last; sample 3: correct
    logits[0, 0] = 5
    logits[1, 1], logits[1, 2] = 5, 4
    logits[2, 3] = 5
    logits[2, 4], logits[2, 5], logits[2, 0], logits[2, 1] = 4, 3, 2, 1
    logits[3, 5] = 5
    labels = torch.tensor([0, 2, 2, 5])
    s = classification_summary(logits, labels)
    assert s["top1_error"] == pytest.approx(50.0)
    assert s["top5_error"] == pytest.approx(25.0)
    assert s["nll"] == pytest.approx(float(F.cross_entropy(logits, labels)))


def test_reliability_bins_match_torchmetrics_ece() -> None:
    logits, labels = overconfident(2000, seed=3)
    probs = logits.softmax(-1)
    bins = reliability_bins(probs, labels, n_bins=15)
    assert int(bins["count"].sum()) == 2000
    expected = multiclass_calibration_error(probs, labels, 10, n_bins=15, norm="l1")
    assert float(bins["ece"]) == pytest.approx(float(expected), abs=1e-5)
    assert classification_summary(logits, labels)["ece"] == pytest.approx(100 * float(expected), abs=1e-3)


def test_reliability_diagram_png(tmp_path: Path) -> None:
    logits, labels = overconfident(500, seed=4)
    png = plot_reliability_diagram(logits, labels, 4.0, tmp_path / "r" / "reliability.png", title="test")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    width = int.from_bytes(data[16:20], "big")
    single = plot_reliability_diagram(logits, labels, None, tmp_path / "single.png")
    assert int.from_bytes(single.read_bytes()[16:20], "big") < width  # one panel without TS, two with it


def test_diagram_goes_to_wandb_when_a_wandb_logger_is_attached(tmp_path: Path) -> None:
    wandb = MagicMock(spec=WandbLogger)
    png = tmp_path / "r.png"
    png.write_bytes(b"x")
    TemperatureScaling._log_image(SimpleNamespace(loggers=[object(), wandb]), png)  # type: ignore[arg-type]
    wandb.log_image.assert_called_once_with(key="test/reliability", images=[str(png)])


def test_kdl_test_fits_temperature_on_validation_and_writes_the_report(kdl, tmp_path: Path) -> None:
    common = [
        "--config",
        str(RECIPES / "fashion_mnist/pskd.yaml"),
        "--data",
        "DigitsDataModule",
        "--data.init_args.train_size",
        "300",
        "--data.init_args.batch_size",
        "64",
        "--model.init_args.net",
        "tinynet",
        "--trainer.default_root_dir",
        "run",
        *QUIET,
    ]
    assert kdl("fit", *common, "--trainer.max_epochs", "1") == 0
    assert kdl("test", *common, "--ckpt_path", "run/checkpoints/best.ckpt") == 0
    reports = sorted(tmp_path.glob("run/lightning_logs/version_*/calibration.json"))
    assert reports, "no calibration.json next to the test run"
    report = json.loads(reports[-1].read_text())
    from kd_lightning.data import DigitsDataModule

    dm = DigitsDataModule()
    n_train, n_test = len(dm.build_dataset("train")), len(dm.build_dataset("test"))
    assert report["n_test"] == n_test and report["n_val"] == round(0.1 * n_train)  # TS fitted on validation only
    assert report["temperature"] > 0 and 0 <= report["ece_ts"] <= 100
    assert (reports[-1].parent / "reliability.png").is_file()
    metrics = (reports[-1].parent / "metrics.csv").read_text()
    for name in ("test/ece_ts", "test/top1_err", "test/top5_err", "test/temperature", "test/f1", "test/ece"):
        assert name in metrics


def test_reliability_diagram_draws_no_bar_for_an_empty_or_tiny_bin(tmp_path: Path) -> None:
    """A bin of one sample is 0 % or 100 % accurate: drawn as a full bar it looks like a finding. Bins under 0.5 %
    of the samples (at least one) get no bar; the histogram under each panel shows every bin's count."""
    from kd_lightning.metrics.calibration import drawn_bins

    count = torch.tensor([0.0, 1.0, 4.0, 5.0, 990.0])
    assert drawn_bins(count).tolist() == [False, False, False, True, True]  # 0.5 % of 1,000 = 5
    assert drawn_bins(count, min_count=1).tolist() == [False, True, True, True, True]
    assert drawn_bins(torch.tensor([0.0, 1.0, 3.0])).tolist() == [False, True, True]  # few samples: at least one
    logits = torch.tensor([[4.0, 0.0]] * 199 + [[0.1, 0.0]])  # one sample near 0.5 confidence
    png = plot_reliability_diagram(logits, torch.zeros(200, dtype=torch.long), None, tmp_path / "r.png")
    assert png.stat().st_size > 0
