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
from tests.helpers import fake_run, tiny_dr, tiny_gan, tiny_teacher


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
def test_report_shows_its_bar_unless_quiet(tmp_path: Path, capsys, quiet: bool) -> None:
    runs = [str(fake_run(tmp_path / f"seed{s}", s, [0.5, 0.6], 0.7)) for s in range(3)]
    assert report_main([*runs, f"--quiet={str(quiet).lower()}"]) == 0
    captured = capsys.readouterr()
    assert "| ImageClassifier resnet8 | 3 | 0, 1, 2 |" in captured.out
    if quiet:
        assert captured.err == ""
    else:
        assert "reading runs: 100%" in captured.err and "3/3" in captured.err
