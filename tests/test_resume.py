"""Exact resumption: an interrupted and resumed fit ends with the same weights as an uninterrupted one.

Each scenario interrupts a short digits/tinynet fit (CPU, one thread, fixed seed, random crop
augmentation on), resumes it with ``--ckpt_path last`` and compares every tensor of the final
checkpoint (weights, buffers, optimiser momentum) bit for bit with the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import kd_lightning.cli as cli
from kd_lightning.callbacks import EXIT_SIGTERM, config_differences
from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.data import DigitsDataModule
from kd_lightning.data.sampler import ResumableDataLoader, ResumableSampler
from tests.helpers import DIGITS_STUDENT, RESUME_ARGS, STEPS_PER_EPOCH, Interrupt, assert_same, final_state


@pytest.fixture
def fit(kdl, kdl_callbacks, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``fit(root, *args, callback=None)`` runs ``kdl fit`` on one thread, optionally with an extra callback."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    extra = kdl_callbacks

    def run(root: str, *args: str, callback: L.Callback | None = None) -> int:
        extra[:] = [callback] if callback else []
        return kdl(
            "fit",
            "--config",
            str(DIGITS_STUDENT),
            *RESUME_ARGS,
            "--trainer.default_root_dir",
            str(tmp_path / root),
            *args,
        )

    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run (computed once per module)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("ref")
    mp.chdir(root)
    mp.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        assert (
            cli.main(
                ["fit", "--config", str(DIGITS_STUDENT), *RESUME_ARGS, "--trainer.default_root_dir", str(root / "run")]
            )
            == 0
        )
    finally:
        mp.undo()
    state = final_state(root / "run" / "checkpoints" / "last.ckpt")
    assert int(state["global_step"]) == 3 * STEPS_PER_EPOCH
    return state


SCENARIOS = {
    # SIGTERM during batch 2 of epoch 1: kdl saves last.ckpt after that step (mid-epoch)
    "mid_epoch_sigterm": (Interrupt("train", 1, 2, "signal"), EXIT_SIGTERM, STEPS_PER_EPOCH + 3),
    # SIGTERM during the last batch of epoch 0: validation and the epoch end run, then stop
    "epoch_end_sigterm": (Interrupt("train", 0, STEPS_PER_EPOCH - 1, "signal"), EXIT_SIGTERM, STEPS_PER_EPOCH),
    # a crash right at the start of epoch 2: the epoch-1 checkpoint is the resume point
    "epoch_boundary_crash": (Interrupt("epoch_start", 2, 0, "raise"), None, 2 * STEPS_PER_EPOCH),
    # SIGTERM in the middle of validation: validation completes, its checkpoint is written, then stop
    "validation_sigterm": (Interrupt("val", 1, 0, "signal"), EXIT_SIGTERM, 2 * STEPS_PER_EPOCH),
    # a crash during validation: resume from the previous epoch's checkpoint
    "validation_crash": (Interrupt("val", 1, 0, "raise"), None, STEPS_PER_EPOCH),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resume_is_bit_exact(fit, reference, tmp_path: Path, scenario: str) -> None:
    callback, expected_exit, resume_step = SCENARIOS[scenario]
    if expected_exit is None:
        with pytest.raises(RuntimeError, match="injected crash"):
            fit("run", callback=callback)
    else:
        assert fit("run", callback=callback) == expected_exit
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == resume_step  # really resumed from where we think
    assert fit("run", "--ckpt_path", "last") == 0
    assert_same(final_state(last), reference)


def test_sampler_order_depends_only_on_seed_and_epoch_and_skips() -> None:
    data = list(range(50))
    a, b = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == data
    c = ResumableSampler(data, seed=3)
    c.set_epoch(1)
    assert list(c) != list(a)
    full = list(a)
    b.load_state_dict(a.state_dict(consumed=20))
    b.set_epoch(2)  # Lightning sets the epoch after loading the state: the position survives
    assert list(b) == full[20:]
    assert list(b) == full  # and only for one pass
    b.load_state_dict(a.state_dict(consumed=20))
    b.set_epoch(3)  # a different epoch: starts from the beginning
    assert len(list(b)) == 50


def test_sampler_shards_by_rank() -> None:
    data = list(range(41))
    shards = [list(ResumableSampler(data, seed=0, num_replicas=4, rank=r, drop_last=True)) for r in range(4)]
    assert all(len(s) == 10 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 40  # disjoint, and only one sample dropped
    padded = [list(ResumableSampler(data, seed=0, num_replicas=4, rank=r)) for r in range(4)]
    assert sorted({i for s in padded for i in s}) == data and all(len(s) == 11 for s in padded)


def test_loader_state_counts_batches_handed_out() -> None:
    data = list(range(20))
    sampler = ResumableSampler(data, seed=0)
    loader = ResumableDataLoader(data, sampler=sampler, batch_size=4)
    it = iter(loader)
    first = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["sampler"]["consumed"] == 8 and state["sampler"]["epoch"] == 0
    rest = [b.tolist() for b in it]
    other = ResumableDataLoader(data, sampler=ResumableSampler(data, seed=0), batch_size=4)
    other.load_state_dict(state)
    assert [b.tolist() for b in other] == rest
    assert len(other) == 5  # Lightning plans the epoch with the full length
    assert [i for chunk in first + rest for i in chunk] == list(sampler.permutation(0))


def test_train_loader_is_resumable_and_uses_no_global_rng() -> None:
    dm = DigitsDataModule(train_size=100, batch_size=10, augment=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    before = torch.get_rng_state()
    iter(loader)
    next(iter(loader))
    assert torch.equal(before, torch.get_rng_state())  # iterator creation / shuffling leave it alone


def test_config_differences_lists_keys() -> None:
    saved = {"model": {"init_args": {"net": "resnet8", "lr": 0.1}}, "data": {"init_args": {"num_workers": 0}}}
    now = {"model": {"init_args": {"net": "tinynet", "lr": 0.1}}, "data": {"init_args": {"num_workers": 4}}}
    assert config_differences(saved, now) == [("model.init_args.net", "resnet8", "tinynet")]


def test_mismatched_resume_is_refused(fit, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fit("run", "--trainer.max_epochs", "1") == 0
    capsys.readouterr()
    code = fit(
        "run",
        "--ckpt_path",
        "last",
        "--data.init_args.batch_size",
        "16",
        "--model.init_args.label_smoothing",
        "0.1",
        "--trainer.max_epochs",
        "2",
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "data.init_args.batch_size: checkpoint=32 now=16" in err
    assert "model.init_args.label_smoothing: checkpoint=0.0 now=0.1" in err
    assert "--allow_resume_mismatch" in err
    # a longer schedule is not a mismatch (trainer settings may change), and the flag overrides
    assert (
        fit(
            "run",
            "--ckpt_path",
            "last",
            "--model.init_args.label_smoothing",
            "0.1",
            "--trainer.max_epochs",
            "2",
            "--allow_resume_mismatch",
            "true",
        )
        == 0
    )
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH
