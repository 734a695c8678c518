"""Clean interruption: SIGTERM to a real ``kdl fit`` process, a kill in the middle of a checkpoint
write, and the NaN guard."""

from __future__ import annotations

import math
import signal
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.callbacks import EXIT_SIGTERM, NaNGuard, NonFiniteLossError
from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.cli import resolve_ckpt_path
from kd_lightning.data import DigitsDataModule
from kd_lightning.methods import ImageClassifier
from tests.helpers import DIGITS_STUDENT, PROCESS_ARGS, QUIET_TRAINER_KW, STEPS_PER_EPOCH, kdl_process, wait_for


def test_sigterm_saves_last_and_exits_143_then_resumes(kdl, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = kdl_process(tmp_path, "--trainer.max_epochs", "200")
    wait_for(last, proc)  # training is under way (epoch 0 is done)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, out
    assert "stopped by SIGTERM" in out
    ckpt = load_checkpoint(last)
    stopped_at = ckpt["global_step"]
    assert STEPS_PER_EPOCH <= stopped_at < 200 * STEPS_PER_EPOCH
    # the checkpoint written on SIGTERM is complete and resumable: finish the interrupted epoch
    # (or one more epoch when it stopped at an epoch end)
    target_epochs = stopped_at // STEPS_PER_EPOCH + 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert (
        kdl(
            "fit",
            "--config",
            str(DIGITS_STUDENT),
            *PROCESS_ARGS,
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.max_epochs",
            str(target_epochs),
            "--ckpt_path",
            "last",
        )
        == 0
    )
    assert load_checkpoint(last)["global_step"] == target_epochs * STEPS_PER_EPOCH


# The second write of last.ckpt (after epoch 1) writes a few bytes, signals the test, and hangs.
HANG_IN_SECOND_LAST_SAVE = textwrap.dedent("""
    import os, time
    from kd_lightning.callbacks import checkpoint_io as cio
    original, seen = cio.AtomicCheckpointIO._write, []
    def write(self, checkpoint, tmp):
        if tmp.endswith("last.ckpt.partial"):
            seen.append(tmp)
            if len(seen) == 2:
                with open(tmp, "wb") as f:
                    f.write(b"PK\\x03\\x04 half a checkpoint")
                    f.flush()
                open(os.environ.get("KDL_TEST_MARKER", "saving"), "w").close()
                time.sleep(600)
        original(self, checkpoint, tmp)
    cio.AtomicCheckpointIO._write = write
""")


def test_kill_during_save_keeps_previous_last(tmp_path: Path) -> None:
    marker = tmp_path / "saving"
    proc = kdl_process(tmp_path, "--trainer.max_epochs", "5", prelude=HANG_IN_SECOND_LAST_SAVE)
    wait_for(marker, proc)
    proc.kill()  # SIGKILL in the middle of writing last.ckpt
    proc.communicate(timeout=60)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / "last.ckpt.partial").exists()  # the torn write is there, under another name
    ckpt = load_checkpoint(ckpt_dir / "last.ckpt")
    assert ckpt["global_step"] == STEPS_PER_EPOCH  # the previous good one (epoch 0)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    # and `--ckpt_path last` resolves to it, not to the torn file
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath=ckpt_dir)], logger=False)
    assert resolve_ckpt_path("last", trainer) == str(ckpt_dir / "last.ckpt")


class PoisonBatch(L.Callback):
    """Put a NaN into one image of the batch at ``(epoch, batch)``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            batch["image"][0, 0, 0, 0] = float("nan")


def test_nan_guard_stops_kdl_and_keeps_last_good_checkpoint(kdl, monkeypatch, tmp_path, capsys) -> None:
    import kd_lightning.cli as cli

    original = cli.KDLCLI.after_instantiate_classes

    def with_poison(self) -> None:
        original(self)
        self.trainer.callbacks.insert(0, PoisonBatch(epoch=1, batch=2))

    monkeypatch.setattr(cli.KDLCLI, "after_instantiate_classes", with_poison)
    code = kdl(
        "fit",
        "--config",
        str(DIGITS_STUDENT),
        *PROCESS_ARGS,
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    )
    err = capsys.readouterr().err
    assert code == 2
    step = STEPS_PER_EPOCH + 2
    assert f"non-finite loss at step {step} (epoch 1, batch 2)" in err
    assert "train/loss=nan" in err
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS_PER_EPOCH  # nothing written after the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


class TwoPartLoss(ImageClassifier):
    """Logs two loss parts; the second one turns infinite at global step 3."""

    def training_step(self, batch, batch_idx):
        ce = self.criterion(self(batch["image"]), batch["label"])
        aux = ce * 0 + (math.inf if self.global_step == 3 else 0.0)
        self.log("train/ce", ce)
        self.log("train/kd/aux", aux)
        return ce + aux


def test_nan_guard_names_the_bad_part(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = DigitsDataModule(train_size=100, batch_size=20)
    model = TwoPartLoss(net="tinynet", num_classes=10, in_channels=1, image_size=8)
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[NaNGuard()],
        enable_checkpointing=False,
        **QUIET_TRAINER_KW,
        default_root_dir=tmp_path,
    )
    before = None

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            nonlocal before
            before = {k: p.detach().clone() for k, p in pl_module.named_parameters()}

    trainer.callbacks.append(Snapshot())
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*train/kd/aux=inf") as info:
        trainer.fit(model, dm)
    assert "train/ce" not in str(info.value)  # only the bad part is named
    # the parameters were not touched by the bad step (BatchNorm statistics did see its forward pass)
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())


@pytest.mark.parametrize("bad_step", [3, 5])
def test_nan_guard_checking_every_n_steps_reports_the_exact_step(tmp_path: Path, bad_step: int) -> None:
    """With checks every 4 steps the guard still sees every step's loss (on the device) and names the step where
    the loss first went bad: found at the next check (step 4, or 8 for a NaN at step 5), never missed."""

    class BadAt(ImageClassifier):
        def training_step(self, batch, batch_idx):
            loss = self.criterion(self(batch["image"]), batch["label"])
            return loss + (math.nan if self.global_step == bad_step else 0.0)

    torch.manual_seed(0)
    model = BadAt(net="tinynet", num_classes=10, in_channels=1, image_size=8)
    trainer = L.Trainer(
        max_steps=20,
        callbacks=[NaNGuard(check_every_n_steps=4)],
        enable_checkpointing=False,
        **QUIET_TRAINER_KW,
        default_root_dir=tmp_path,
    )
    found = 4 if bad_step == 3 else 8
    with pytest.raises(NonFiniteLossError, match=rf"step {bad_step} \(found at step {found}: checks run every 4"):
        trainer.fit(model, DigitsDataModule(train_size=200, batch_size=20))
    assert trainer.global_step == found


def test_nan_guard_checks_every_step_on_a_cpu_by_default(tmp_path: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", **QUIET_TRAINER_KW, default_root_dir=tmp_path)
    assert NaNGuard().every_n(trainer) == 1 and NaNGuard(check_every_n_steps=8).every_n(trainer) == 8
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        NaNGuard(check_every_n_steps=0)
