"""``make demo``'s precision choice and one tiny run of it on digits (the main job's code path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_lightning import demo


@pytest.mark.parametrize(
    ("amx", "cuda", "expected"), [(True, False, "bf16-mixed"), (False, False, "32-true"), (True, True, "32-true")]
)
def test_auto_precision_is_bf16_only_on_a_cpu_with_amx(
    amx: bool, cuda: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(demo, "amx_bf16_available", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert demo.resolve_precision("auto") == expected
    for given in ("32-true", "bf16-mixed"):  # an explicit choice is kept
        assert demo.resolve_precision(given) == given


@pytest.mark.parametrize("flags", ["fpu avx512_bf16 amx_tile amx_int8", "fpu avx512_bf16 amx_bf16 amx_tile"])
def test_the_demo_and_kdl_fit_share_one_cpu_bf16_check(flags: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One check: AMX-BF16 as Linux lists it (tiles and AVX-512 bf16 alone are not enough), for the demo and kdl."""
    import builtins
    import io

    from kd_lightning import cpu

    real_open = builtins.open
    monkeypatch.setattr(
        builtins,
        "open",
        lambda f, *a, **k: io.StringIO(f"flags : {flags}\n") if f == "/proc/cpuinfo" else real_open(f, *a, **k),
    )
    assert cpu.cpu_has_fast_bf16() is ("amx_bf16" in flags)
    assert demo.amx_bf16_available() is cpu.cpu_has_fast_bf16()


def test_demo_runs_teacher_and_students_on_digits_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder
) -> None:
    argv = ["--root", str(tmp_path / "none"), "--teacher", "tinynet", "--student", "tinynet", "--epochs", "1"]
    assert demo.main([*argv, "--out", str(tmp_path / "out"), "--precision", "32-true"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "precision 32-true" in out and "scikit-learn digits" in out
    for noise in ("Test metric", "Trainable params", "smaller than the logging interval"):  # no repeat of the table
        assert noise not in out + captured.err, noise
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["teacher", "student_nokd", "student_blkd"]
    for name in ("teacher", "student_nokd", "student_blkd"):
        assert (tmp_path / "out" / name / "checkpoints" / "best.ckpt").is_file()
        for png in ("curves.png", "reliability.png"):  # each run's plots, listed at the end
            assert f"{tmp_path / 'out' / name / 'plots' / png}" in out
    best = {n: (tmp_path / "out" / n / "checkpoints" / "best.ckpt").stat().st_mtime_ns for n in ("teacher",)}

    # a second demo with the same settings trains nothing and prints the same table
    assert demo.main([*argv, "--out", str(tmp_path / "out"), "--precision", "32-true"]) == 0
    again = capsys.readouterr().out
    assert again.count("done before with the same settings, not retrained") == 3
    assert [r for r in again.splitlines() if r.startswith("| ") and "%" in r] == rows
    assert (tmp_path / "out/teacher/checkpoints/best.ckpt").stat().st_mtime_ns == best["teacher"]
    # --force retrains
    assert demo.main([*argv, "--out", str(tmp_path / "out"), "--precision", "32-true", "--force"]) == 0
    assert "not retrained" not in capsys.readouterr().out
    # the retrained runs replaced the earlier ones: one fit and one test version each, as after the first demo
    for name in ("teacher", "student_nokd", "student_blkd"):
        versions = sorted(p.name for p in (tmp_path / "out" / name / "lightning_logs").iterdir())
        assert versions == ["version_0", "version_1"], (name, versions)
    # the demo's own advice filters: retraining into its folders, and Lightning's logging-interval advice
    advice = ("exists and is not empty", "logging interval")
    assert not [w for w in recwarn if any(a in str(w.message) for a in advice)]


def test_make_demo_takes_its_size_from_make_variables() -> None:
    """``make demo EPOCHS=3 TRAIN_SIZE=5000 FORCE=1`` passes them on (make -n prints the commands, runs nothing)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["make", "-n", "-C", str(repo), "demo", "EPOCHS=3", "TRAIN_SIZE=5000", "FORCE=1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-m kd_lightning.demo --epochs 3 --train-size 5000 --force" in done.stdout


@pytest.mark.slow
def test_demo_compiles_its_fits_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--root", str(tmp_path / "none"), "--teacher", "tinynet", "--student", "tinynet", "--epochs", "1"]
    assert demo.main([*argv, "--out", str(tmp_path / "out"), "--compile"]) == 0
    out = capsys.readouterr().out
    assert "precision 32-true, compiled:" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 3
    for name in ("teacher", "student_nokd", "student_blkd"):  # each fit's saved config lists the callback
        config = next((tmp_path / "out" / name).rglob("config.yaml")).read_text()
        assert "kd_lightning.callbacks.Compile" in config


def test_a_teacher_below_the_student_alone_is_pointed_out() -> None:
    rows = [
        {"name": "teacher", "test_acc1": 0.24, "n_train": 2000},
        {"name": "student_nokd", "test_acc1": 0.41, "n_train": 2000},
        {"name": "student_blkd", "test_acc1": 0.09, "n_train": 2000},
    ]
    note = demo.weak_teacher_warning(rows, epochs=1)
    assert note is not None and "teacher (24.00% test top-1) is below the student trained alone (41.00%)" in note
    assert "1 epoch(s)" in note and "EPOCHS=3" in note
    rows[0]["test_acc1"] = 0.80
    assert demo.weak_teacher_warning(rows, epochs=1) is None
