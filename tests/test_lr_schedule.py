"""``kd_lightning.methods.CosineLR``: a cosine schedule whose length follows ``trainer.max_epochs``."""

from __future__ import annotations

import lightning as L
import pytest

from tests.helpers import DIGITS_STUDENT, QUIET_TRAINER

TINY = ["--model.init_args.net", "tinynet", "--data.init_args.train_size", "64", "--data.init_args.batch_size", "32"]
TINY += ["--trainer.limit_val_batches", "1", *QUIET_TRAINER]


class LearningRates(L.Callback):
    """The learning rate of every training step."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def _rates(kdl, kdl_callbacks: list, *args: str) -> list[float]:
    rates = LearningRates()
    kdl_callbacks[:] = [rates]
    assert kdl("fit", "--config", str(DIGITS_STUDENT), *TINY, *args) == 0
    return rates.seen


def test_unset_t_max_follows_max_epochs_like_an_explicit_one(kdl, kdl_callbacks: list) -> None:
    """The recipe's CosineLR without T_max gives the LR sequence of torch's CosineAnnealingLR with
    T_max = max_epochs, and an explicit T_max still wins."""
    epochs = ["--trainer.max_epochs", "5"]
    follows = _rates(kdl, kdl_callbacks, *epochs, "--trainer.default_root_dir", "a")
    explicit = ["--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR"]
    explicit += ["--model.init_args.lr_scheduler.init_args.T_max", "5"]
    by_hand = _rates(kdl, kdl_callbacks, *epochs, *explicit, "--trainer.default_root_dir", "b")
    assert len(follows) == 10 and follows == by_hand  # 2 steps per epoch, identical floats
    assert follows[0] == pytest.approx(0.05) and follows[-1] < 0.01
    longer = _rates(kdl, kdl_callbacks, *epochs, "--model.init_args.lr_scheduler.init_args.T_max", "10",
                    "--trainer.default_root_dir", "c")  # fmt: skip
    assert longer[-1] > 0.02  # half-way down a 10-epoch cosine
    self_kd = _rates(kdl, kdl_callbacks, *epochs, "--model", "PSKD", "--trainer.default_root_dir", "d")
    assert self_kd == follows  # SelfKD builds its scheduler through the same BaseTask.build_scheduler


def test_unset_t_max_without_max_epochs_is_one_clear_message(kdl, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--trainer.max_epochs", "-1", "--trainer.max_steps", "2"]
    assert kdl("fit", "--config", str(DIGITS_STUDENT), *TINY, *args) == 2
    err = capsys.readouterr().err
    assert "CosineLR without T_max follows trainer.max_epochs, which is -1" in err and "Traceback" not in err
