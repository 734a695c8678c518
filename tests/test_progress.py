"""Long non-training jobs show a progress bar on stderr, and ``--quiet`` hides it.

Training-time work (filling DistillModule's teacher cache, MEKD's queries) happens inside the Trainer's loop and
follows ``--trainer.enable_progress_bar``; these are the jobs outside it: ``kdl generate`` (burn-in, cDR-RS
sampling, filtering) and ``kdl report``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_lightning.report import main as report_main
from kd_lightning.sampling.generate import main as generate_main
from tests.helpers import DIGITS_STUDENT, RECIPES, fake_run, tiny_dr, tiny_gan, tiny_teacher


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("progress")
    out = {"generator": tiny_gan(d / "gan.ckpt"), "teacher": tiny_teacher(d / "teacher.ckpt")}
    out["density_ratio"] = tiny_dr(d / "dr.ckpt", out["generator"], out["teacher"])
    return out


def generate_args(parts: dict[str, Path], out: Path, *extra: str) -> list[str]:
    small = ["--per_class=3", "--burn_in=20", "--batch_size=8", "--shard_size=24"]
    return [f"--{k}={v}" for k, v in parts.items()] + [f"--out={out}", *small, *extra]


@pytest.mark.parametrize("quiet", [[], ["--quiet=true"], ["--progress=false"]], ids=["bar", "quiet", "no-progress"])
def test_generate_shows_its_bar_unless_quiet(parts, tmp_path: Path, capsys, quiet: list[str]) -> None:
    assert generate_main(generate_args(parts, tmp_path / "store", *quiet)) == 0
    err = capsys.readouterr().err
    assert "store " in err and "30 accepted" in err  # the summary line is always there
    if quiet:
        assert "%|" not in err and "accepted:" not in err and "burn-in (" not in err
    else:  # tqdm's bar: the accepted images out of 30, with the unit being sampled (its burn-in first)
        assert "accepted: 100%" in err and "30/30" in err
        assert "class-0 burn-in (20 proposals)" in err and "class-9 acceptance" in err


@pytest.mark.parametrize("quiet", [False, True], ids=["bar", "quiet"])
def test_report_shows_its_bar_unless_quiet(tmp_path: Path, capsys, monkeypatch, quiet: bool) -> None:
    """On a terminal and for 20 runs or more (fewer, or a pipe: never; tests/test_report.py checks those rules)."""
    from tests.test_report import _Terminal

    runs = [str(fake_run(tmp_path / f"seed{s}", s, [0.5, 0.6], 0.7)) for s in range(20)]
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert report_main([*runs, f"--quiet={str(quiet).lower()}"]) == 0
    assert "| ImageClassifier resnet8 | 20 | " in capsys.readouterr().out
    if quiet:
        assert terminal.buffer.getvalue() == ""
    else:
        assert "reading runs: 100%" in terminal.buffer.getvalue() and "20/20" in terminal.buffer.getvalue()


def test_a_fit_into_a_log_writes_plain_epoch_lines_and_no_noise(
    tmp_path: Path,
    kdl,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stderr is no terminal here (as in a log file): one line per epoch, no bar redraws, no advice about other runs.

    A KD run's frozen teacher is in eval mode by design, so Lightning's "modules in eval mode" warning is dropped;
    the GPU/TPU lines and the model summary's column of ``FLOPs 0`` go too. The progress file names the last epoch.
    """
    monkeypatch.setenv("KDL_PROGRESS_FILE", str(tmp_path / "progress.txt"))
    tiny = ["--model.init_args.net", "tinynet", "--data.init_args.train_size", "100", "--trainer.max_epochs", "2"]
    teacher = ["fit", "--config", str(DIGITS_STUDENT), *tiny, "--trainer.default_root_dir", str(tmp_path / "t")]
    assert kdl(*teacher) == 0
    blkd = ["--config", str(RECIPES / "digits/blkd.yaml"), "--trainer.default_root_dir", str(tmp_path / "b")]
    assert kdl("fit", *blkd, *tiny, "--model.init_args.teacher", str(tmp_path / "t/checkpoints/best.ckpt")) == 0
    out, err = capfd.readouterr()
    both = out + err + caplog.text + "\n".join(str(w.message) for w in recwarn)  # pytest takes logs and warnings
    epochs = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in epochs] == ["1/2", "2/2", "1/2", "2/2"]
    assert "train/loss" in epochs[0] and "val/acc1" in epochs[0] and epochs[0].endswith(" s)")
    assert "\r" not in both and "it/s" not in both
    for noise in ("GPU available", "TPU available", "FLOPs", "Total Flops", "in eval mode at the start"):
        assert noise not in both, noise
    assert "Modules in eval mode" in both  # the summary itself stays
    assert (tmp_path / "progress.txt").read_text().startswith("epoch 2/2  train/loss")
    # every fit leaves its learning curves in its run folder, drawn from its metrics.csv
    from kd_lightning.callbacks.plots import read_epochs

    for run in ("t", "b"):
        assert (tmp_path / run / "plots/curves.png").stat().st_size > 0
    metrics = read_epochs(next((tmp_path / "b/lightning_logs").rglob("metrics.csv")))
    assert sorted(metrics["val/acc1"]) == [0, 1] and sorted(metrics["train/loss"]) == [0, 1]
    assert f"curves: {tmp_path / 'b/plots/curves.png'}" in out
