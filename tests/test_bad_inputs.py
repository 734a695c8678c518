"""The bad-input catalogue: what a new user gets wrong, and the one clear message kdl answers with.

Every case runs ``kdl`` in-process and checks: the exit status (2), no traceback, a first line that
starts with ``kdl``'s error prefix, and the bad value (or key, or file) named in the message.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from kd_lightning.checkpoints import TRUST_ENV, load_checkpoint, trust_scope
from kd_lightning.errors import CheckpointError
from tests.helpers import QUIET_TRAINER, RECIPES, REPO

STUDENT = str(RECIPES / "digits/student.yaml")
BLKD = str(RECIPES / "digits/blkd.yaml")
#: a few steps of a tiny net on digits (always installed), quiet
TINY = [
    "--model.init_args.net",
    "tinynet",
    "--data.init_args.train_size",
    "128",
    "--data.init_args.batch_size",
    "32",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_val_batches",
    "1",
    *QUIET_TRAINER,
    "--trainer.default_root_dir",
    "run",
]


class Evil:
    """A pickle that would create a file when unpickled (what a malicious checkpoint does)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


@dataclass
class Case:
    args: list[str]
    says: list[str]
    files: dict[str, str | bytes | None] = field(default_factory=dict)  # written in the run folder first
    prefix: str = "kdl: error:"
    max_lines: int = 5  # a few lines: the message, maybe a hint, the debug pointer


CASES: dict[str, Case] = {
    # ---- the command line
    "no arguments": Case(
        [], ["kdl commands:", "kdl fit", "kdl sample", "kdl pipeline"], prefix="kdl commands:", max_lines=12
    ),
    "unknown subcommand": Case(["fitt", "--help"], ["invalid choice: 'fitt'", "see `kdl --help`"]),
    "unknown key": Case(["fit", "--config", STUDENT, "--foo", "1"], ["unrecognized arguments: --foo"]),
    "abbreviated key is not accepted": Case(
        ["fit", "--config", STUDENT, "--trainer.max_epoch", "1", "--print_config"],
        ["--trainer.max_epoch", "did you mean --trainer.max_epochs?"],
    ),
    "wrong type": Case(["fit", "--config", STUDENT, "--trainer.max_epochs", "abc"], ["trainer.max_epochs", "abc"]),
    "wrong type in a class's argument": Case(
        ["fit", "--config", STUDENT, "--data.init_args.batch_size", "x"], ["batch_size", "Got value: x"]
    ),
    # ---- recipe files
    "missing recipe": Case(["fit", "--config", "nope.yaml"], ["--config 'nope.yaml' does not exist"]),
    "recipe is a folder": Case(["fit", "--config", "."], ["--config '.' is a folder"]),
    "empty recipe": Case(["fit", "--config", "empty.yaml"], ["'empty.yaml' is empty", "mapping"], {"empty.yaml": ""}),
    "recipe is a list": Case(
        ["fit", "--config", "list.yaml"], ["'list.yaml' holds a list", "mapping"], {"list.yaml": "- a\n- b\n"}
    ),
    "recipe is a scalar": Case(["fit", "--config", "s.yaml"], ["'s.yaml' holds a str"], {"s.yaml": "hello\n"}),
    "malformed recipe": Case(
        ["fit", "--config", "bad.yaml"], ["'bad.yaml' is not valid YAML at line 2"], {"bad.yaml": "model: [\n"}
    ),
    "unknown KD loss": Case(
        ["fit", "--config", BLKD, "--config", "loss.yaml", "--print_config"],
        ["unknown KD loss 'BLKDX'", "known losses:", "BLKD", "CRD"],
        {"loss.yaml": "model:\n  init_args:\n    kd_losses:\n      - class_path: BLKDX\n"},
    ),
    "unknown net": Case(
        ["fit", "--config", STUDENT, *TINY[2:], "--model.init_args.net", "resnet9"], ["'resnet9'", "resnet8"]
    ),
    # ---- values
    "batch size 0": Case(["fit", "--config", STUDENT, *TINY[:2], "--data.init_args.batch_size", "0"], ["batch_size=0"]),
    "negative batch size": Case(["fit", "--config", STUDENT, "--data.init_args.batch_size", "-3"], ["batch_size=-3"]),
    "val_fraction out of range": Case(
        ["fit", "--config", STUDENT, "--data.init_args.val_fraction", "1.5"], ["val_fraction=1.5", "[0, 1)"]
    ),
    "train_size 0": Case(["fit", "--config", STUDENT, "--data.init_args.train_size", "0"], ["train_size=0"]),
    "negative learning rate": Case(
        ["fit", "--config", STUDENT, *TINY, "--model.init_args.optimizer.init_args.lr", "-0.1"],
        ["Invalid learning rate: -0.1", "model.init_args.optimizer"],
    ),
    "negative momentum": Case(
        ["fit", "--config", STUDENT, *TINY, "--model.init_args.optimizer.init_args.momentum", "-1"],
        ["momentum", "-1"],
    ),
    # ---- data
    "missing data root": Case(
        ["fit", "--config", str(RECIPES / "fashion_mnist/student.yaml"), "--data.init_args.root", "/does/not/exist"],
        ["'/does/not/exist' does not exist"],
    ),
    "data root is a file": Case(
        ["fit", "--config", str(RECIPES / "fashion_mnist/student.yaml"), "--data.init_args.root", "afile"],
        ["'afile' is a file"],
        {"afile": "x"},
    ),
    "garbage data files": Case(
        ["fit", "--config", str(RECIPES / "fashion_mnist/student.yaml"), "--data.init_args.root", "junk"],
        ["junk"],
        {
            "junk/train-images-idx3-ubyte": b"garbage",
            "junk/train-labels-idx1-ubyte": b"garbage",
            "junk/t10k-images-idx3-ubyte": b"garbage",
            "junk/t10k-labels-idx1-ubyte": b"garbage",
        },
    ),
    # ---- checkpoints
    "checkpoint path is a folder": Case(
        ["test", "--config", STUDENT, "--ckpt_path", "."], ["checkpoint '.' is a folder", "expected a file"]
    ),
    "missing checkpoint": Case(
        ["test", "--config", STUDENT, "--ckpt_path", "gone.ckpt"], ["'gone.ckpt' does not exist"]
    ),
    "checkpoint is no checkpoint": Case(
        ["test", "--config", STUDENT, "--ckpt_path", "junk.ckpt"], ["'junk.ckpt' cannot be read"], {"junk.ckpt": b"no"}
    ),
    "missing teacher": Case(
        ["fit", "--config", BLKD, "--model.init_args.teacher", "none.ckpt"], ["'none.ckpt' does not exist"]
    ),
    "teacher path is a folder": Case(["fit", "--config", BLKD, "--model.init_args.teacher", "."], ["'.' is a folder"]),
    # ---- kdl sample
    "sample: missing checkpoint": Case(
        ["sample", "--ckpt", "gone.ckpt", "--per_class", "2", "--out", "s.pt"],
        ["'gone.ckpt' does not exist"],
        prefix="kdl sample: error:",
    ),
    "sample: checkpoint is a folder": Case(
        ["sample", "--ckpt", ".", "--per_class", "2", "--out", "s.pt"], ["'.' is a folder"], prefix="kdl sample: error:"
    ),
}


def run_case(kdl, capsys: pytest.CaptureFixture[str], tmp_path: Path, case: Case) -> tuple[int, str]:
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else (content or "").encode())
    capsys.readouterr()
    code = kdl(*case.args)
    _, err = capsys.readouterr()
    return code, err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_message(name: str, kdl, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    case = CASES[name]
    code, err = run_case(kdl, capsys, tmp_path, case)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("Seed set", "GPU available", "TPU"))]
    assert code == 2, err
    assert "Traceback" not in err, err
    message = "\n".join(lines)
    first = next(ln for ln in lines if ln.startswith(case.prefix.split(":")[0]))
    assert first.startswith(case.prefix), message
    for text in case.says:
        assert text in message, f"{text!r} not in:\n{message}"
    assert len(lines) <= case.max_lines, message


def test_catalogue_size() -> None:
    """The README states how many cases the catalogue covers; keep it honest."""
    readme = (REPO / "README.md").read_text()
    assert f"{len(CASES) + len(MORE_CASES)} bad inputs" in readme


# ---------------------------------------------------------------------------------------------- cases with set-up
MORE_CASES = (
    "test_untrusted_checkpoint_is_refused_and_runs_nothing",
    "test_legacy_and_plain_pickle_checkpoints_say_what_they_are",
    "test_explicit_checkpoint_path_resumes_with_the_same_recipe",
    "test_resume_into_another_net_is_refused_even_when_allowed",
    "test_disk_full_while_saving_says_so_and_keeps_last",
    "test_sample_on_a_missing_cuda_device",
)


@pytest.fixture
def trained(kdl, tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert kdl("fit", "--config", STUDENT, *TINY) == 0
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_untrusted_checkpoint_is_refused_and_runs_nothing(
    kdl, capsys, tmp_path: Path, trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = torch.load(trained, weights_only=True)
    ckpt["payload"] = Evil()
    torch.save(ckpt, tmp_path / "evil.ckpt")
    pwned = tmp_path / "pwned"
    own = ["--ckpt_path", str(trained)]  # the run's own checkpoint
    capsys.readouterr()
    for args in (
        # trusting the run's own checkpoint trusts that file only, not a teacher given in the same command
        ["test", "--config", BLKD, *TINY, "--model.init_args.teacher", "evil.ckpt", *own, "--weights_only", "false"],
        ["fit", "--config", BLKD, *TINY, "--model.init_args.teacher", "evil.ckpt", "--trust", str(trained)],
        ["test", "--config", STUDENT, *TINY, "--ckpt_path", "evil.ckpt"],
        ["fit", "--config", STUDENT, *TINY, "--ckpt_path", "evil.ckpt"],
        ["fit", "--config", BLKD, *TINY, "--model.init_args.teacher", "evil.ckpt"],
        ["serve-teacher", "--ckpt", "evil.ckpt"],
    ):
        assert kdl(*args) == 2, args
        err = capsys.readouterr().err
        assert not pwned.exists(), args
        assert "'evil.ckpt' holds more than tensors" in err and "--trust evil.ckpt" in err, err
        assert "posix.system" in err or "os.system" in err
        assert "Traceback" not in err
    # the old process-wide switch trusts nothing now, and says so
    monkeypatch.setenv(TRUST_ENV, "1")
    assert kdl("test", "--config", STUDENT, *TINY, "--ckpt_path", "evil.ckpt") == 2
    assert f"{TRUST_ENV}=1 no longer trusts every file" in capsys.readouterr().err
    assert not pwned.exists()
    monkeypatch.delenv(TRUST_ENV)
    # a user who trusts the file names it, and then it loads (and its code runs, as they accepted)
    for args in (
        ["test", "--config", STUDENT, *TINY, "--ckpt_path", "evil.ckpt", "--weights_only", "false"],
        ["test", "--config", STUDENT, *TINY, "--ckpt_path", "evil.ckpt", "--trust", "evil.ckpt"],
    ):
        assert kdl(*args) == 0, capsys.readouterr().err
        assert pwned.exists(), args
        pwned.unlink()
    with trust_scope([tmp_path / "evil.ckpt"]):
        assert load_checkpoint(tmp_path / "evil.ckpt")["global_step"] > 0
    pwned.unlink()
    monkeypatch.setenv(TRUST_ENV, os.pathsep.join(["other.ckpt", str(tmp_path / "evil.ckpt")]))  # scoped: paths
    assert load_checkpoint("evil.ckpt")["global_step"] > 0
    pwned.unlink()
    monkeypatch.delenv(TRUST_ENV)
    with pytest.raises(CheckpointError, match="holds more than tensors"):  # the scopes ended: refused again
        load_checkpoint(tmp_path / "evil.ckpt")
    assert kdl("test", "--config", STUDENT, "--trust", "nope.ckpt") == 2
    assert "--trust 'nope.ckpt' does not exist" in capsys.readouterr().err


def test_legacy_and_plain_pickle_checkpoints_say_what_they_are(kdl, capsys, tmp_path: Path, trained: Path) -> None:
    ckpt = torch.load(trained, weights_only=True)
    torch.save(ckpt, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)  # PyTorch's pre-1.6 format
    torch.save({**ckpt, "payload": Evil()}, tmp_path / "old_evil.ckpt", _use_new_zipfile_serialization=False)
    with open(tmp_path / "plain.ckpt", "wb") as f:
        pickle.dump(ckpt, f)
    test = ["test", "--config", STUDENT, *TINY, "--ckpt_path"]
    capsys.readouterr()
    assert kdl(*test, "old.ckpt") == 0, capsys.readouterr().err  # safe: it loads (not memory-mapped)
    assert kdl(*test, "old_evil.ckpt") == 2
    err = capsys.readouterr().err
    assert "'old_evil.ckpt' (PyTorch's legacy pre-1.6 format) holds more than tensors" in err, err
    assert "--trust old_evil.ckpt" in err and "mmap" not in err and not (tmp_path / "pwned").exists()
    assert kdl(*test, "old_evil.ckpt", "--weights_only", "false") == 0, capsys.readouterr().err  # trusted: loads
    assert (tmp_path / "pwned").exists()
    assert kdl(*test, "plain.ckpt") == 2
    err = capsys.readouterr().err
    assert "'plain.ckpt' cannot be read: it is a plain Python pickle, not a torch.save file" in err, err
    assert "torch.save(pickle.load(" in err and "Traceback" not in err and "mmap" not in err


def test_explicit_checkpoint_path_resumes_with_the_same_recipe(kdl, capsys, trained: Path) -> None:
    steps = load_checkpoint(trained)["global_step"]
    copy = trained.parent.parent / "saved.ckpt"
    copy.write_bytes(trained.read_bytes())
    capsys.readouterr()
    args = [a if a != "1" else "2" for a in TINY]  # one more epoch (max_epochs 1 -> 2)
    assert kdl("fit", "--config", STUDENT, *args, "--ckpt_path", str(copy)) == 0, capsys.readouterr().err
    assert load_checkpoint(trained)["global_step"] == 2 * steps


def test_resume_into_another_net_is_refused_even_when_allowed(kdl, capsys, trained: Path) -> None:
    other = [a if a != "tinynet" else "resnet8" for a in TINY]
    for extra in ([], ["--allow_resume_mismatch", "true"]):
        capsys.readouterr()
        assert kdl("fit", "--config", STUDENT, *other, "--ckpt_path", str(trained), *extra) == 2
        err = capsys.readouterr().err
        assert "holds a 'tinynet' net, the recipe builds 'resnet8'" in err, err
    # kdl test with a recipe of another net: the same message (not a tensor-shape traceback)
    assert kdl("test", "--config", STUDENT, *other, "--ckpt_path", str(trained)) == 2
    assert "holds a 'tinynet' net" in capsys.readouterr().err


def test_disk_full_while_saving_says_so_and_keeps_last(
    kdl,
    capsys,
    trained: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kd_lightning.callbacks.checkpoint_io import AtomicCheckpointIO

    before = trained.read_bytes()

    def full(self, checkpoint, tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "_write", full)
    capsys.readouterr()
    args = [a if a != "1" else "2" for a in TINY]
    assert kdl("fit", "--config", STUDENT, *args, "--ckpt_path", "last") == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and ".ckpt is intact" in err, err
    assert "Traceback" not in err
    assert trained.read_bytes() == before
    assert not list(trained.parent.glob("*.partial")) and not list(trained.parent.glob(".tmp-*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_sample_on_a_missing_cuda_device(kdl, capsys) -> None:
    from tests.helpers import GAN_ARGS

    assert kdl("fit", *GAN_ARGS, "--trainer.max_steps", "2", "--trainer.default_root_dir", "gan") == 0
    ckpt = "gan/checkpoints/last.ckpt"
    capsys.readouterr()
    assert kdl("sample", "--ckpt", ckpt, "--per_class", "1", "--out", "s.pt", "--device", "cuda") == 2
    assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err
    # the default (auto) runs on what there is, and files get the usual permissions
    old = os.umask(0o022)
    try:
        assert kdl("sample", "--ckpt", ckpt, "--per_class", "1", "--out", "s.pt", "--no_progress") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat("s.pt").st_mode) == 0o644
    assert kdl("sample", "--ckpt", ckpt, "--per_class", "0", "--out", "s.pt") == 2
    assert "--per_class 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- warnings, exits
def test_train_size_above_the_data_warns_with_both_numbers(kdl, capsys) -> None:
    with pytest.warns(UserWarning, match=r"train_size=100000 but DigitsDataModule has \d+ training samples"):
        assert kdl("fit", "--config", STUDENT, *TINY, "--data.init_args.train_size", "100000") == 0


def test_no_validation_split_says_what_is_written(kdl, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="val_fraction=0: no validation split.*last.ckpt is written"):
        assert kdl("fit", "--config", STUDENT, *TINY, "--data.init_args.val_fraction", "0") == 0
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()


def test_help_lists_every_command(kdl, capsys) -> None:
    assert kdl("--help") == 0
    out = capsys.readouterr().out
    for name in ("fit", "test", "sample", "generate", "pipeline", "serve-teacher"):
        assert f"kdl {name}" in out


def test_ctrl_c_saves_and_exits_130(tmp_path: Path) -> None:
    from tests.helpers import kdl_process, wait_for

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = kdl_process(tmp_path, "--trainer.max_epochs", "200")
    wait_for(last, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "stopped by SIGINT after saving" in out and "Traceback" not in out
    assert load_checkpoint(last)["global_step"] > 0
    for noise in ("args parameter is intended", "LeafSpec"):  # Lightning's warnings that say nothing to a user
        assert noise not in out
