"""``kdl generate`` and ``kdl sample`` when the disk or the folder lets them down: a run killed during its first
manifest write resumes, and a full disk, a read-only or file ``--out`` and a missing GPU are one line, exit 2."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch

from kd_lightning.commands import run_tool_command
from kd_lightning.sampling.generate import generate
from kd_lightning.sampling.store import MANIFEST, StoreError
from tests.helpers import cfg, folder_bytes


def argv(parts: dict[str, Path], out: Path, *more: str) -> list[str]:
    """``kdl generate`` arguments for a tiny store (2 per class)."""
    return [
        *("--generator", str(parts["gan"]), "--density_ratio", str(parts["dr"]), "--teacher", str(parts["teacher"])),
        *("--per_class", "2", "--burn_in", "50", "--batch_size", "8", "--shard_size", "4", "--quiet", "true"),
        *("--out", str(out), *more),
    ]


def one_line_exit_2(capsys: pytest.CaptureFixture[str], command: str, args: list[str]) -> str:
    """Run a kdl tool command; it must exit 2 with one line on stderr and no traceback. Returns the line."""
    capsys.readouterr()
    assert run_tool_command(command, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"kdl {command}: error: "), err
    return err


def sample_argv(parts: dict[str, Path], out: Path) -> list[str]:
    """``kdl sample`` arguments: 2 images per class of the tiny GAN to ``out``."""
    return ["--ckpt", str(parts["gan"]), "--per_class", "2", "--no_progress", "--out", str(out)]


def leave_a_temporary(folder: Path, name: str, data: bytes) -> Path:
    """What a writer SIGKILLed inside ``atomic_write_bytes`` leaves: its temporary file, under the same naming."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=name)
    os.write(fd, data)
    os.close(fd)
    return Path(tmp)


def test_a_run_killed_during_its_first_manifest_write_resumes(parts: dict[str, Path], tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    generate(cfg(parts, whole, per_class=2))
    out = tmp_path / "killed"
    leave_a_temporary(out, MANIFEST, b'{\n "finished": false,\n "form')  # half a manifest, never renamed
    generate(cfg(parts, out, per_class=2))
    assert folder_bytes(out) == folder_bytes(whole)  # no temporary file left either
    # a leftover of a later shard write is removed when the store is resumed
    leave_a_temporary(out, "shard-00003.bin", b"KDLSHARD1\n")
    generate(cfg(parts, out, per_class=2))
    assert folder_bytes(out) == folder_bytes(whole)
    # files that are not ours still make a folder foreign
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"exists and is not empty but holds no manifest\.json"):
        generate(cfg(parts, other, per_class=2))


def test_a_full_disk_is_one_line_and_the_run_resumes(
    parts: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kd_lightning.sampling.store as store_module

    real = store_module.atomic_write_bytes
    writes: list[str] = []

    def fill_up(path: str, data: bytes) -> None:
        writes.append(os.path.basename(path))
        if os.path.basename(path).startswith("shard-") and len([w for w in writes if w.startswith("shard-")]) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    monkeypatch.setattr(store_module, "atomic_write_bytes", fill_up)
    out = tmp_path / "store"
    err = one_line_exit_2(capsys, "generate", argv(parts, out))
    assert "no space left on the device" in err and str(out) in err and "run the same command again" in err
    monkeypatch.setattr(store_module, "atomic_write_bytes", real)
    assert run_tool_command("generate", argv(parts, out)) == 0  # space freed: it resumes and finishes
    whole = tmp_path / "whole"
    assert run_tool_command("generate", argv(parts, whole)) == 0
    assert folder_bytes(out) == folder_bytes(whole)


def test_out_that_is_a_file_or_read_only_is_one_line(
    parts: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "store"):
        err = one_line_exit_2(capsys, "generate", argv(parts, out))
        assert "is a file, not a folder" in err and str(a_file) in err
    assert one_line_exit_2(capsys, "sample", sample_argv(parts, a_file))
    err = one_line_exit_2(
        capsys,
        "sample",
        sample_argv(parts, a_file / "x.pt"),
    )
    assert "is a file, not a folder" in err
    # a read-only folder: refused by its mode for a normal user; root writes anyway, so the write is made to fail as
    # it fails for a user (EACCES from the temporary file) to check that this too is one line
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)

    def denied(*args: object, dir: str | None = None, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(str(dir), ".tmp-x"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        err = one_line_exit_2(capsys, "generate", argv(parts, locked / "store"))
        assert "writable" in err and str(locked) in err
        err = one_line_exit_2(
            capsys,
            "sample",
            sample_argv(parts, locked / "x.pt"),
        )
        assert "writable" in err and str(locked) in err
    finally:
        locked.chmod(0o755)


def test_generate_on_cuda_without_a_gpu_is_one_line(
    parts: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever this runs
    err = one_line_exit_2(capsys, "generate", argv(parts, tmp_path / "s", "--device", "cuda"))
    assert "'cuda'" in err and "CUDA is not available" in err
    err = one_line_exit_2(capsys, "generate", argv(parts, tmp_path / "s", "--device", "gpu0"))
    assert "'gpu0' is not a device" in err
    assert not (tmp_path / "s").exists()
