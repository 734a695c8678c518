"""The bad-input catalogue: what a new user gets wrong, and the one clear message kdl answers with.

Every case runs ``kdl`` in-process and checks: the exit status (2), no traceback, a first line that
starts with ``kdl``'s error prefix, and the bad value (or key, or file) named in the message.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import signal
import stat
import struct
import zlib
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


FASHION = str(RECIPES / "fashion_mnist/student.yaml")


def idx_bytes(shape: tuple[int, ...], values: bytes) -> bytes:
    """An uncompressed uint8 idx file (MNIST's format) of ``shape`` holding ``values``."""
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + values


#: an MNIST-format folder whose training labels hold a 12 (Fashion-MNIST has classes 0..9)
BAD_LABELS = {
    "bad/train-images-idx3-ubyte": idx_bytes((20, 28, 28), bytes(20 * 28 * 28)),
    "bad/train-labels-idx1-ubyte": idx_bytes((20,), bytes([i % 10 for i in range(19)] + [12])),
    "bad/t10k-images-idx3-ubyte": idx_bytes((10, 28, 28), bytes(10 * 28 * 28)),
    "bad/t10k-labels-idx1-ubyte": idx_bytes((10,), bytes(range(10))),
}


def png_bytes(side: int = 4, claimed: int | None = None) -> bytes:
    """A grey PNG of ``side`` pixels whose header claims ``claimed`` x ``claimed`` (a decompression bomb's header)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    if claimed is not None:  # IHDR: 8-byte signature, length, "IHDR", width, height, ..., CRC of type + data
        data[16:24] = struct.pack(">II", claimed, claimed)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


#: a recipe on an image-folder dataset ("imgs/{train,test}/{a,b}/"), tiny and quiet
FOLDER_RECIPE = (
    "seed_everything: 0\n"
    "trainer: {max_epochs: 1, logger: false, enable_progress_bar: false, enable_model_summary: false}\n"
    "model: {class_path: ImageClassifier, init_args: {net: tinynet}}\n"
    "data: {class_path: ImageFolderDataModule, init_args: {root: imgs, image_size: 8, batch_size: 2, "
    "val_fraction: 0, grayscale: true, num_workers: 0}}\n"
)


def image_folder(bad: bytes) -> dict[str, str | bytes | None]:
    """The files of an image-folder dataset whose training image ``imgs/train/a/2.png`` is ``bad``."""
    files: dict[str, str | bytes | None] = {"folder.yaml": FOLDER_RECIPE}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(3):
                files[f"imgs/{split}/{cls}/{i}.png"] = png_bytes()
    files["imgs/train/a/2.png"] = bad
    return files


#: a pipeline of one tool stage whose run folder is ``${root}/g``
PIPE_ROOT = "vars: {root: runs}\nstages:\n  - {name: g, command: generate, dir: '${root}/g'}\n"


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
        [], ["kdl commands:", "kdl fit", "kdl sample", "kdl pipeline"], prefix="kdl commands:", max_lines=20
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
        ["'/does/not/exist' does not exist", "docs/datasets.md", "kdl check-data"],
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
    "train_size below the number of classes": Case(
        ["fit", "--config", STUDENT, *TINY, "--data.init_args.train_size", "5"],
        ["train_size=5 is below the 10 classes", "train_size >= 10"],
    ),
    "negative num_workers": Case(
        ["fit", "--config", STUDENT, *TINY, "--data.init_args.num_workers", "-1"], ["num_workers=-1", "expected 0"]
    ),
    "learning rate nan": Case(
        ["fit", "--config", STUDENT, *TINY, "--model.init_args.optimizer.init_args.lr", "nan"],
        ["model.init_args.optimizer.init_args.lr=nan; expected a finite number"],
        max_lines=2,
    ),
    "T_max 0": Case(
        ["fit", "--config", STUDENT, *TINY, "--model.init_args.lr_scheduler.init_args.T_max", "0"],
        ["CosineLR: T_max=0", "expected a positive number"],
    ),
    # ---- run folders
    "run folder is a file": Case(
        ["fit", "--config", STUDENT, *TINY, "--trainer.default_root_dir", "afile"],
        ["trainer.default_root_dir 'afile' is a file", "expected a folder"],
        {"afile": "x"},
    ),
    "run folder under a file": Case(
        ["fit", "--config", STUDENT, *TINY, "--trainer.default_root_dir", "afile/run"],
        ["'afile/run' lies under", "afile', a file"],
        {"afile": "x"},
    ),
    # ---- data files
    "label outside the classes in an idx file": Case(
        ["fit", "--config", FASHION, *TINY, "--data.init_args.root", "bad"],
        ["train-labels-idx1-ubyte: label 12 of sample 19 is outside the classes 0..9"],
        BAD_LABELS,
    ),
    "decompression-bomb image": Case(
        ["fit", "--config", "folder.yaml"],
        ["imgs/train/a/2.png' is too large to decode safely", "exceeds limit"],
        image_folder(png_bytes(claimed=20_000)),
    ),
    "corrupt image read by a worker process": Case(
        ["fit", "--config", "folder.yaml", "--data.init_args.num_workers", "2"],
        ["image file", "imgs/train/a/2.png' is corrupt or truncated"],
        image_folder(b"\x89PNG\r\n\x1a\n" + b"garbage" * 8),
        max_lines=2,  # the message and the debug pointer: not the worker's traceback
    ),
    # ---- checkpoints for test/validate/predict
    "test without a checkpoint": Case(
        ["test", "--config", STUDENT, *TINY], ["kdl test without --ckpt_path would evaluate an untrained", "none"]
    ),
    "predict without a checkpoint": Case(["predict", "--config", STUDENT, *TINY], ["kdl predict without --ckpt_path"]),
    "test with last of a mistyped run folder": Case(
        ["test", "--config", STUDENT, *TINY, "--trainer.default_root_dir", "runn", "--ckpt_path", "last"],
        ["--ckpt_path last: no last checkpoint in", "runn"],
    ),
    "test with best and no best checkpoint": Case(
        ["validate", "--config", STUDENT, *TINY, "--ckpt_path", "best"], ["--ckpt_path best: no best checkpoint in"]
    ),
    # ---- kdl pipeline
    "pipeline: unclosed ${": Case(
        ["pipeline", "--config", "p.yaml"],
        ["p.yaml: stage 'g' dir:", "'${root/g' has a '${' without its closing '}'"],
        {"p.yaml": PIPE_ROOT.replace("${root}/g", "${root/g")},
        prefix="kdl pipeline: error:",
    ),
    "pipeline: unknown variable": Case(
        ["pipeline", "--config", "p.yaml", "--vars.rooot", "elsewhere"],
        ["p.yaml: --vars.rooot: the pipeline has no variable 'rooot' (variables: root)"],
        {"p.yaml": PIPE_ROOT},
        prefix="kdl pipeline: error:",
    ),
    "pipeline: two stages write one run folder": Case(
        ["pipeline", "--config", "p.yaml"],
        ["p.yaml: stage 'h': stage 'g' already writes 'runs/g'"],
        {"p.yaml": PIPE_ROOT + "  - {name: h, command: generate, dir: '${root}/g'}\n"},
        prefix="kdl pipeline: error:",
    ),
    "pipeline: run folder under a file": Case(
        ["pipeline", "--config", "p.yaml", "--vars.root", "afile"],
        ["stage 'g' dir 'afile/g' lies under", "afile', a file"],
        {"p.yaml": PIPE_ROOT, "afile": "x"},
        prefix="kdl pipeline: error:",
    ),
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
    "test_trust_reaches_serve_teacher_and_the_stages_of_a_pipeline",
    "test_ckpt_path_none_evaluates_the_untrained_model_on_purpose",
    "test_legacy_and_plain_pickle_checkpoints_say_what_they_are",
    "test_explicit_checkpoint_path_resumes_with_the_same_recipe",
    "test_resume_into_another_net_is_refused_even_when_allowed",
    "test_disk_full_while_saving_says_so_and_keeps_last",
    "test_sample_on_a_missing_cuda_device",
    "test_a_teacher_trained_on_another_image_size_is_refused",
    "test_a_read_only_run_folder_is_named",
    "test_16_mixed_on_a_cpu_without_amx_warns",
    "test_a_second_ctrl_c_exits_130",
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


def test_trust_reaches_serve_teacher_and_the_stages_of_a_pipeline(
    kdl, capsys, tmp_path: Path, trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--trust`` is accepted by every command: kdl serve-teacher loads the named file, and kdl pipeline hands it to
    its stages (their own processes), which dropped it before and then refused the file the user had trusted."""
    import uvicorn

    ckpt = torch.load(trained, weights_only=True)
    torch.save({**ckpt, "payload": Evil()}, tmp_path / "evil.ckpt")
    pwned = tmp_path / "pwned"
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)  # loaded and ready: nothing to listen on here
    capsys.readouterr()
    assert kdl("serve-teacher", "--ckpt", "evil.ckpt", "--trust", "evil.ckpt") == 0, capsys.readouterr().err
    assert pwned.exists()
    pwned.unlink()
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the stage's own kdl process imports this checkout
    monkeypatch.delenv(TRUST_ENV, raising=False)
    (tmp_path / "p.yaml").write_text(
        "stages:\n  - {name: s, command: sample, dir: runs/s, args: [--ckpt, evil.ckpt, --per_class, 1, --out, s.pt]}\n"
    )
    assert kdl("pipeline", "--config", "p.yaml", "--trust", "evil.ckpt") != 0  # the stage fails: it is no GAN ...
    log = (tmp_path / "runs/s/pipeline/s.log").read_text()
    assert "not by a GAN" in log, log  # ... found after reading the file it was told to trust
    assert pwned.exists() and "holds more than tensors" not in log
    assert TRUST_ENV not in os.environ  # the trust ended with the command


def test_ckpt_path_none_evaluates_the_untrained_model_on_purpose(kdl, capsys) -> None:
    with pytest.warns(UserWarning, match="--ckpt_path none: evaluating the model as the recipe builds it"):
        assert kdl("test", "--config", STUDENT, *TINY, "--ckpt_path", "none") == 0


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


def test_a_teacher_trained_on_another_image_size_is_refused(kdl, capsys, tmp_path: Path, monkeypatch) -> None:
    """A 16 px teacher on 8 px digits ran (its nets pool globally) and taught poorly; now both sizes are named."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    teacher = [a if a != "run" else "teacher" for a in TINY]
    assert kdl("fit", "--config", STUDENT, *teacher, "--data.init_args.image_size", "16") == 0
    capsys.readouterr()
    assert kdl("fit", "--config", BLKD, *TINY, "--model.init_args.teacher", "teacher/checkpoints/last.ckpt") == 2
    err = capsys.readouterr().err
    assert "was trained on image_size=16 but the student 'tinynet' has image_size=8" in err, err
    assert "Traceback" not in err
    # at the teacher's size it is accepted
    assert (
        kdl(
            "fit", "--config", BLKD, *TINY, "--model.init_args.teacher", "teacher/checkpoints/last.ckpt",
            "--data.init_args.image_size", "16",
        )
        == 0
    )  # fmt: skip


def test_a_read_only_run_folder_is_named(kdl, capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kdl fit, kdl pipeline (``--vars.root``) and kdl report (``--out``) in a read-only folder: one line, exit 2.

    Root may write into a 0o555 folder, so the checks and writes are made to fail as they do for a user."""
    import tempfile

    (tmp_path / "ro").mkdir(mode=0o555)
    ro = str(tmp_path / "ro")
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not str(p).startswith(ro) and access(p, mode, **kw))
    mkstemp = tempfile.mkstemp

    def denied(*args: object, dir: str | None = None, **kwargs: object) -> tuple[int, str]:
        if str(dir).startswith(ro):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(str(dir), ".tmp-x"))
        return mkstemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    capsys.readouterr()
    assert kdl("fit", "--config", STUDENT, *TINY, "--trainer.default_root_dir", "ro/run") == 2
    err = capsys.readouterr().err
    assert "trainer.default_root_dir 'ro/run'" in err and "is not writable" in err and "Traceback" not in err
    (tmp_path / "p.yaml").write_text(PIPE_ROOT)
    assert kdl("pipeline", "--config", "p.yaml", "--vars.root", "ro") == 2
    err = capsys.readouterr().err
    assert "stage 'g' dir 'ro/g'" in err and "is not writable" in err and "Traceback" not in err
    from tests.helpers import fake_run

    run = fake_run(tmp_path / "a_run", 0, [0.5], 0.5)
    assert kdl("report", str(run), "--quiet", "--out", "ro/report.md") == 2
    err = capsys.readouterr().err
    assert "--out 'ro/report.md': cannot write there: Permission denied" in err and err.count("\n") == 1, err


def test_16_mixed_on_a_cpu_without_amx_warns(kdl, monkeypatch) -> None:
    """Lightning runs fp16 AMP as bf16 on a CPU: the slow-bf16 warning applies to it too."""
    import kd_lightning.cli as cli

    monkeypatch.setattr(cli, "cpu_has_fast_bf16", lambda: False)
    args = [*TINY, "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "16-mixed"]
    with pytest.warns(
        UserWarning, match=r"'16-mixed' \(on a CPU, Lightning runs it as bf16-mixed\) on a CPU without AMX"
    ):
        assert kdl("fit", "--config", STUDENT, *args) == 0


def test_a_second_ctrl_c_exits_130(kdl, kdl_callbacks, capsys, trained: Path) -> None:
    """The first Ctrl-C asks for a clean stop; a second aborts at once (Lightning exits 1): kdl says 130."""
    import lightning as L

    class CtrlCTwice(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            signal.raise_signal(signal.SIGINT)  # the handler runs before raise_signal returns
            signal.raise_signal(signal.SIGINT)

    before = trained.read_bytes()
    kdl_callbacks.append(CtrlCTwice())
    previous = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    try:
        code = kdl("fit", "--config", STUDENT, *[a if a != "1" else "3" for a in TINY], "--ckpt_path", "last")
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT after an abort
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT, err
    assert "aborted by a second Ctrl-C without saving" in err and "Traceback" not in err
    assert trained.read_bytes() == before  # nothing was saved over last.ckpt
