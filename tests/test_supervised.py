"""Supervised tasks: they learn, their metrics mean what they say, checkpoints carry normalisation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.data import DigitsDataModule
from kd_lightning.methods import ImageClassifier, ImageRegressor
from kd_lightning.metrics import classification_metrics
from tests.helpers import digit_value_regressor, digits_classifier, quiet_trainer


def test_classifier_learns_digits_on_held_out_test(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, dm = digits_classifier()
    trainer = quiet_trainer(tmp_path, max_epochs=5)
    trainer.fit(model, dm)
    result = trainer.test(model, dm, verbose=False)[0]
    assert result["test/acc1"] > 0.85  # chance is 0.10
    assert result["test/acc5"] >= result["test/acc1"]
    assert 0.0 <= result["test/ece"] < 0.2


def test_top1_is_micro_not_per_class_average() -> None:
    m = classification_metrics(3)
    logits = torch.tensor([[5.0, 0, 0]] * 8 + [[0, 5.0, 0], [5.0, 0, 0]])
    labels = torch.tensor([0] * 8 + [1, 2])
    out = m(logits, labels)
    assert out["acc1"].item() == pytest.approx(9 / 10)  # the per-class mean would be (1 + 1 + 0) / 3
    f1_class0 = 2 * (8 / 9) * 1.0 / (8 / 9 + 1.0)  # precision 8/9, recall 1
    assert out["f1"].item() == pytest.approx((f1_class0 + 1.0 + 0.0) / 3, rel=1e-5)


def test_ece_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.5, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    bins = torch.clamp((conf * 15).ceil().long() - 1, 0, 14)
    ece = sum(
        (conf[bins == b].mean() - correct[bins == b].mean()).abs() * (bins == b).float().mean() for b in bins.unique()
    )
    assert classification_metrics(2)(logits, labels)["ece"].item() == pytest.approx(ece.item(), abs=1e-6)


def test_normalisation_is_stored_and_weights_stay_channels_last(tmp_path: Path) -> None:
    model, dm = digits_classifier()
    assert model.net.stage1[0].weight.is_contiguous(memory_format=torch.channels_last)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.normalize.mean.flatten().tolist() == pytest.approx([dm.mean[0]])
    x = torch.rand(3, 1, 8, 8)
    model.eval(), loaded.eval()
    assert torch.allclose(model(x), loaded(x), atol=1e-6)


def test_regressor_trains_on_normalised_labels_and_reports_original_units(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, dm = digit_value_regressor()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.float32 and batch["label"].min() >= 0 and batch["label"].max() <= 1
    trainer = quiet_trainer(tmp_path, max_epochs=6)
    trainer.fit(model, dm)
    res = trainer.test(model, dm, verbose=False)[0]
    preds = trainer.predict(model, dm)
    labels = torch.cat([p["label"] for p in preds])
    assert labels.max() == 9.0 and labels.min() == 0.0  # labels and predictions come back in original units
    constant_mae = (labels - labels.median()).abs().mean().item()  # the best constant predictor, ~2.5
    assert res["test/mae"] < 0.75 * constant_mae
    mae = (torch.cat([p["prediction"] for p in preds]) - labels).abs().mean().item()
    assert res["test/mae"] == pytest.approx(mae, rel=1e-4)
    assert res["test/rmse"] >= res["test/mae"]


def test_regressor_refuses_classification_data(tmp_path: Path) -> None:
    from kd_lightning.errors import ConfigError

    dm = DigitsDataModule()
    model = ImageRegressor(net="tinynet", in_channels=1)
    with pytest.raises(ConfigError, match="regression model but DigitsDataModule is a classification"):
        quiet_trainer(tmp_path, max_steps=1).fit(model, dm)


def test_bad_arguments_name_the_value() -> None:
    from kd_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"label_smoothing=1.5"):
        ImageClassifier(net="tinynet", num_classes=10, label_smoothing=1.5)
    with pytest.raises(ConfigError, match="needs num_classes"):
        ImageClassifier(net="tinynet")
    with pytest.raises(ConfigError, match=r"mean=.*in_channels=3"):
        ImageClassifier(net="tinynet", num_classes=10, in_channels=3, mean=(0.1, 0.2), std=(1.0, 1.0))


def test_metrics_logged_once_per_epoch_give_the_epoch_values_of_logging_every_step(tmp_path: Path) -> None:
    """log_metrics registers the torchmetrics objects on the first update after each reset only (each
    ``self.log`` costs Lightning milliseconds); the epoch values stay those of logging them every step."""

    class EveryStep(ImageClassifier):
        def log_metrics(self, stage, metrics):
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test")

    class Record(L.Callback):
        def __init__(self) -> None:
            self.values: list[dict[str, float]] = []

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.values.append({k: float(v) for k, v in trainer.callback_metrics.items() if "acc" in k})

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.values.append({k: float(v) for k, v in trainer.callback_metrics.items() if "acc" in k})

    def fit(cls: type[ImageClassifier]) -> list[dict[str, float]]:
        L.seed_everything(0)
        dm = DigitsDataModule(batch_size=64, augment=False)
        opt = lambda p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
        model = cls(net="tinynet", num_classes=10, in_channels=1, mean=dm.mean, std=dm.std, optimizer=opt)
        record = Record()
        quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=4, limit_val_batches=2, callbacks=[record]).fit(
            model, dm
        )
        return record.values

    class Counted(ImageClassifier):
        calls = 0

        def log_dict(self, *args, **kwargs) -> None:
            Counted.calls += 1
            super().log_dict(*args, **kwargs)

    ours, every_step = fit(Counted), fit(EveryStep)
    assert Counted.calls == 3 + 3 + 1  # per epoch: once for train, once for val; once in the sanity check
    assert len(ours) == 6 and {"train/acc1", "val/acc1"} <= set(ours[-1])
    assert ours == every_step
    assert len({v["train/acc1"] for v in ours if "train/acc1" in v}) > 1  # per-epoch values, not one frozen value
