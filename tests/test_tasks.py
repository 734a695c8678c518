"""TaskSpec: what differs between classification and regression, asked instead of branched on."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.methods import DistillModule, ImageClassifier, ImageRegressor
from kd_lightning.methods.tasks import Classification, Regression, task_spec
from tests.helpers import write_teacher


def test_classification_spec() -> None:
    spec = task_spec("classification", label_smoothing=0.2)
    assert (
        isinstance(spec, Classification)
        and spec.has_classes
        and (spec.monitor, spec.monitor_mode)
        == (
            "val/acc1",
            "max",
        )
    )
    assert spec.out_features(7) == 7
    logits, label = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]), torch.tensor([0, 1])
    assert torch.equal(spec.prediction(logits), logits)
    expected = nn.functional.cross_entropy(logits, label, label_smoothing=0.2)
    assert float(spec.loss(spec.criterion(), logits, label)) == pytest.approx(float(expected))
    train, val, _ = spec.metrics(3)
    spec.update_metrics(val, logits, label, lambda y: y * 100)  # no denormalisation for classes
    assert float(val.compute()["val/acc1"]) == pytest.approx(0.5)
    assert "val/ece" in set(val.keys()) and "train/ece" not in set(train.keys())  # the cheap set while training
    out = spec.predict_output(torch.tensor([4, 5]), logits, label, lambda y: y)
    assert set(out) == {"index", "logits", "label"}
    with pytest.raises(ConfigError, match="needs num_classes"):
        spec.out_features(None)
    with pytest.raises(ConfigError, match=r"label_smoothing=1\.0"):
        Classification(1.0)


def test_regression_spec_works_on_normalised_labels_and_reports_original_units() -> None:
    spec = task_spec("regression", regression_loss="l1")
    assert isinstance(spec, Regression) and not spec.has_classes and spec.monitor == "val/mae"
    assert spec.out_features(None) == 1 and isinstance(spec.criterion(), nn.L1Loss)
    raw, label = torch.tensor([[0.25], [0.75]]), torch.tensor([0.5, 0.5])
    pred = spec.prediction(raw)
    assert pred.shape == (2,)
    assert float(spec.loss(spec.criterion(), pred, label)) == pytest.approx(0.25)
    _, val, _ = spec.metrics(None)
    spec.update_metrics(val, pred, label, lambda y: y * 90 - 45)  # [0, 1] -> [-45, 45] degrees
    assert float(val.compute()["val/mae"]) == pytest.approx(22.5)
    out = spec.predict_output(torch.tensor([0, 1]), pred, label, lambda y: y * 90 - 45)
    assert out["prediction"].tolist() == [-22.5, 22.5] and out["label"].tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="loss='huber'"):
        Regression("huber")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="task='ranking'"):
        task_spec("ranking")


def test_methods_ask_their_spec_instead_of_branching(tmp_path: Path) -> None:
    from kd_lightning.methods import distill, supervised

    for module in (distill, supervised):
        source = inspect.getsource(module)
        assert "task ==" not in source and "task !=" not in source, module.__name__
    assert isinstance(ImageClassifier(net="tinynet", num_classes=3, in_channels=1).spec, Classification)
    regressor = ImageRegressor(net="tinynet", in_channels=1, label_range=(0.0, 9.0))
    assert isinstance(regressor.spec, Regression) and regressor.monitor == "val/mae"
    teacher = write_teacher(tmp_path / "t.ckpt", 4, 1, net="tinynet")
    student = DistillModule(teacher=str(teacher), net="tinynet", num_classes=4, in_channels=1, label_smoothing=0.1)
    assert student.task == "classification" and student.spec.label_smoothing == 0.1  # the teacher's task
    assert student.monitor == "val/acc1"
