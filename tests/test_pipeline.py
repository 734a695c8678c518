"""``kdl pipeline``: schema and references, skip/rerun rules, resume after a kill, failures, background stages.

Most tests run the stages with tests/fake_kdl.py (a stand-in for ``kdl`` that starts in a fraction of a
second and keeps a journal of what ran); one runs real ``kdl fit``/``kdl test`` stages, and the slow
ones run the shipped digits pipeline and kill a real training stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from kd_lightning import pipeline
from kd_lightning.cli import main as kdl_main
from kd_lightning.pipeline import Ready, main, resolve
from tests.helpers import REPO

RECIPES = REPO / "recipes"
FAKE_KDL = f"{sys.executable} {REPO / 'tests' / 'fake_kdl.py'}"

# a -> b (uses a.best) -> c (uses b.best) ; d (uses a.best) ; t tests b
PIPELINE = """
vars: {root: runs, epochs: 2}
stages:
  - name: a
    command: fit
    config: recipe.yaml
    dir: ${root}/a
  - name: b
    command: fit
    config: recipe.yaml
    dir: ${root}/b
    args: {trainer.max_epochs: "${epochs}", model.teacher: "${a.best}"}
  - name: c
    command: fit
    config: recipe.yaml
    dir: ${root}/c
    args: {model.teacher: "${b.best}"}
  - name: d
    command: fit
    config: recipe.yaml
    dir: ${root}/d
    args: {model.teacher: "${a.best}", model.width: 3}
  - name: t
    command: test
    config: recipe.yaml
    dir: ${root}/b
    args: {ckpt_path: "${b.best}"}
"""
RECIPE = "seed_everything: 0\ntrainer: {max_epochs: 1}\nmodel: {width: 8}\n"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Work in ``tmp_path`` with the fake kdl; returns a function giving the journal's entries so far."""
    return use_fake_kdl(tmp_path, monkeypatch)


def use_fake_kdl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The ``fake`` fixture's work (tests/test_pipeline_jobs.py uses it too)."""
    monkeypatch.chdir(tmp_path)
    journal = tmp_path / "journal.jsonl"
    monkeypatch.setenv(pipeline.LAUNCHER_ENV, FAKE_KDL)
    monkeypatch.setenv("FAKE_KDL_JOURNAL", str(journal))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "pipe.yaml").write_text(PIPELINE)

    def entries() -> list[dict]:
        return [json.loads(ln) for ln in journal.read_text().splitlines()] if journal.exists() else []

    return entries


def ran(entries: list[dict]) -> list[str]:
    """Stage run folders (``runs/x``) in the order their commands ran, with ``:test`` for test commands."""
    return [str(e["root"]) + (":test" if e["command"] == "test" else "") for e in entries]


def lines(out: str) -> dict[str, str]:
    """The progress display's final state per stage name (``skipped``, ``done``, ...)."""
    found = {}
    for ln in out.splitlines():
        if ln.startswith("["):
            _, name, state, *_ = [*ln.split(maxsplit=3), ""]
            found[name] = state
    return found


def test_run_then_everything_is_skipped(fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "pipe.yaml", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert lines(plan) == {"a": "run", "b": "run", "c": "run", "d": "run", "t": "run"}
    assert "input a.best is rebuilt by stage 'a' first" in plan
    assert "$ kdl fit --config recipe.yaml --trainer.max_epochs 2 --model.teacher runs/a/checkpoints/best.ckpt" in plan
    assert fake() == []  # a dry run runs nothing

    assert main(["--config", "pipe.yaml"]) == 0
    assert lines(capsys.readouterr().out) == {"a": "done", "b": "done", "c": "done", "d": "done", "t": "done"}
    assert ran(fake()) == ["runs/a", "runs/b", "runs/c", "runs/d", "runs/b:test"]
    # the stage's run folder is the one the command alone writes; log and record sit in <dir>/pipeline/
    assert Path("runs/b/checkpoints/last.ckpt").is_file() and Path("runs/b/pipeline/b.log").is_file()
    assert "epoch 1 done" in Path("runs/b/pipeline/b.log").read_text()
    rec = json.loads(Path("runs/b/pipeline/b.json").read_text())
    assert rec["status"] == "done" and rec["attempts"] == 1
    a_best = Path("runs/a/checkpoints/best.ckpt").read_bytes()
    assert rec["inputs"] == {"a.best": hashlib.sha256(a_best).hexdigest()}
    assert (
        rec["outputs"]["last"]["sha256"]
        == hashlib.sha256(Path("runs/b/checkpoints/last.ckpt").read_bytes()).hexdigest()
    )

    assert main(["--config", "pipe.yaml"]) == 0
    out = capsys.readouterr().out
    assert lines(out) == {"a": "skipped", "b": "skipped", "c": "skipped", "d": "skipped", "t": "skipped"}
    assert "0 stage(s) run, 5 skipped" in out
    assert len(fake()) == 5  # nothing ran again
    assert main(["--config", "pipe.yaml", "--dry-run"]) == 0
    assert set(lines(capsys.readouterr().out).values()) == {"skip"}


def test_the_pipeline_ends_with_a_results_table_and_its_plots(fake, capsys) -> None:
    """Each fit's best validation metric and each test's metrics, run or skipped, then the PNGs of the run folders."""
    for attempt in ("run", "skipped"):
        assert main(["--config", "pipe.yaml"]) == 0
        out = capsys.readouterr().out
        table = out[out.index("Results") :]
        rows = {ln.split(" | ")[0].strip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
        assert "best val/acc1 0.6000 (epoch 1) | runs/b |" in rows["b"], attempt  # max_epochs 2: 0.5, 0.6
        assert "best val/acc1 0.5000 (epoch 0) | runs/a |" in rows["a"]
        assert "| t | test | test/acc1 0.5000  test/loss 1.2500 | runs/b |" in rows["t"]
        assert "Plots:\n  runs/a/plots/curves.png\n  runs/b/plots/curves.png" in out
    # the stage's own progress: the fit wrote its epoch into the file the pipeline named for it
    assert Path("runs/b/pipeline/b.progress").read_text().strip() == "epoch 2/2"
    assert json.loads(Path("runs/b/pipeline/b.json").read_text())["results"]["value"] == 0.6


def test_a_gan_fit_s_result_is_the_last_point_of_its_quality_curve(tmp_path: Path) -> None:
    """A GAN logs no validation metric: its row shows GANQuality's last FID, Intra-FID and label consistency."""
    from kd_lightning.pipeline.report import results_table, stage_results

    run = tmp_path / "cgan"
    logs = run / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,step,train/d_loss,train/g_loss\n0,9,1.2,0.8\n")
    (run / "samples").mkdir()
    history = [
        {"step": 200, "quality/fid": 80.5, "quality/intra_fid": 120.25, "quality/label_consistency": 0.31},
        {"step": 400, "quality/fid": 41.2, "quality/intra_fid": 95.5, "quality/label_consistency": 0.725},
    ]
    (run / "samples" / "quality.json").write_text(json.dumps(history))
    results = stage_results("fit", str(run))
    assert results == {"quality/fid": 41.2, "quality/intra_fid": 95.5, "quality/label_consistency": 0.725, "step": 400}
    row = results_table([("cgan", "fit", str(run), results)]).splitlines()[-1]
    expected = "last quality/fid 41.2000  quality/intra_fid 95.5000  quality/label_consistency 0.7250 (step 400)"
    assert row == f"| cgan | fit | {expected} | {run} |"
    assert stage_results("fit", str(run), since=time.time() + 60) == {}  # an older run's file does not count
    (run / "samples" / "quality.json").write_text(json.dumps([{"step": 400}]))  # no teacher: nothing measured
    assert results_table([("cgan", "fit", str(run), stage_results("fit", str(run)))]).endswith(
        "| cgan | fit | (no metrics found) | " + str(run) + " |"
    )


def test_a_running_stage_shows_its_progress_file_or_else_its_log_s_last_line(tmp_path: Path) -> None:
    from kd_lightning.pipeline.report import stage_progress

    log, progress = tmp_path / "s.log", tmp_path / "s.progress"
    log.write_text("=== kdl pipeline: stage 's'\nSeed set to 0\r\naccepted:  40%|####  | 400/1000\raccepted:  45%|")
    assert stage_progress(str(progress), str(log), since=0) == "accepted:  45%|"  # a bar's latest redraw
    progress.write_text("epoch 3/15 step 20/45\n")
    assert stage_progress(str(progress), str(log), since=0) == "epoch 3/15 step 20/45"
    assert stage_progress(str(progress), str(log), since=time.time() + 60) == "accepted:  45%|"  # stale file
    assert stage_progress(str(progress), str(log), since=0, width=8) == "epoch 3/"


def test_a_changed_value_reruns_its_stage_and_the_stages_that_consume_it(fake, capsys) -> None:
    assert main(["--config", "pipe.yaml"]) == 0
    before = {p: Path(f"runs/{p}/checkpoints/best.ckpt").read_bytes() for p in "abcd"}
    n = len(fake())
    capsys.readouterr()
    # the middle stage b gets a longer schedule: b, c (uses b.best) and t (tests b.best) rerun; a and d do not
    assert main(["--config", "pipe.yaml", "--vars.epochs", "3", "--dry-run"]) == 0
    plan = lines(capsys.readouterr().out)
    assert plan == {"a": "skip", "b": "run", "c": "run", "d": "skip", "t": "run"}
    assert main(["--config", "pipe.yaml", "--vars.epochs", "3", "--dry-run"]) == 0
    assert "config changed: trainer.max_epochs 2 -> 3" in capsys.readouterr().out
    assert main(["--config", "pipe.yaml", "--vars.epochs", "3"]) == 0
    assert lines(capsys.readouterr().out) == {"a": "skipped", "b": "done", "c": "done", "d": "skipped", "t": "done"}
    assert ran(fake()[n:]) == ["runs/b", "runs/c", "runs/b:test"]
    after = {p: Path(f"runs/{p}/checkpoints/best.ckpt").read_bytes() for p in "abcd"}
    assert [after[p] == before[p] for p in "abcd"] == [True, False, False, True]

    # editing a recipe file reruns every stage that reads it; a comment or key order changes nothing
    n = len(fake())
    Path("recipe.yaml").write_text("# a comment\nmodel: {width: 8}\ntrainer: {max_epochs: 1}\nseed_everything: 0\n")
    assert main(["--config", "pipe.yaml", "--vars.epochs", "3"]) == 0
    assert len(fake()) == n
    Path("recipe.yaml").write_text(RECIPE.replace("width: 8", "width: 16"))
    assert main(["--config", "pipe.yaml", "--vars.epochs", "3", "--dry-run"]) == 0
    plan_text = capsys.readouterr().out
    assert "[1/5] a  run         config changed: model.width 8 -> 16" in plan_text
    assert set(lines(plan_text).values()) == {"run"}  # d sets its own width but uses a.best


def test_an_output_changed_outside_the_pipeline_reruns_its_consumers(fake, capsys) -> None:
    assert main(["--config", "pipe.yaml"]) == 0
    n = len(fake())
    Path("runs/b/checkpoints/best.ckpt").write_bytes(b"fine-tuned by hand")
    assert main(["--config", "pipe.yaml"]) == 0
    assert ran(fake()[n:]) == ["runs/c", "runs/b:test"]
    # a deleted output reruns its own stage
    n = len(fake())
    Path("runs/d/checkpoints/last.ckpt").unlink()
    assert main(["--config", "pipe.yaml"]) == 0
    assert ran(fake()[n:]) == ["runs/d"]


def test_only_from_force_and_a_missing_input(fake, capsys) -> None:
    # --only b on a fresh folder: b's input a.best does not exist
    assert main(["--config", "pipe.yaml", "--only", "b"]) == 2
    err = capsys.readouterr().err
    assert "stage 'b' cannot run: input a.best (runs/a/checkpoints/best.ckpt) does not exist" in err
    assert "run stage 'a' first" in err and fake() == []
    assert main(["--config", "pipe.yaml", "--only", "a,d"]) == 0
    assert ran(fake()) == ["runs/a", "runs/d"]
    assert main(["--config", "pipe.yaml", "--from", "c", "--dry-run"]) == 0
    assert lines(capsys.readouterr().out) == {"a": "off", "b": "off", "c": "blocked", "d": "skip", "t": "blocked"}
    assert main(["--config", "pipe.yaml"]) == 0
    n = len(fake())
    assert main(["--config", "pipe.yaml", "--from", "d", "--force"]) == 0
    assert ran(fake()[n:]) == ["runs/d", "runs/b:test"]
    Path("runs/a/checkpoints/best.ckpt").unlink()  # a is done, its best.ckpt is gone
    assert main(["--config", "pipe.yaml", "--only", "b", "--force"]) == 2
    assert "stage 'a' is done but left no such file (rerun it: --only a --force)" in capsys.readouterr().err
    assert main(["--config", "pipe.yaml", "--only", "x"]) == 2
    assert "--only x: no stage named 'x' (stages: a, b, c, d, t)" in capsys.readouterr().err
    assert main(["--config", "pipe.yaml", "--from", "nope"]) == 2


def test_a_failing_stage_stops_the_pipeline_with_its_name_status_and_log(fake, capsys) -> None:
    Path("bad.yaml").write_text("fake: {fail: 3}\n")
    text = PIPELINE.replace(
        "config: recipe.yaml\n    dir: ${root}/c", "config: [recipe.yaml, bad.yaml]\n    dir: ${root}/c"
    )
    Path("pipe.yaml").write_text(text)
    assert main(["--config", "pipe.yaml"]) == 3
    captured = capsys.readouterr()
    assert "stage 'c' failed with exit status 3; log: runs/c/pipeline/c.log" in captured.err
    assert "kdl: error: fake failure in fit" in captured.err  # the log's last lines
    assert lines(captured.out) == {"a": "done", "b": "done", "c": "failed"}
    assert ran(fake()) == ["runs/a", "runs/b", "runs/c"]  # d and t never started
    rec = json.loads(Path("runs/c/pipeline/c.json").read_text())
    assert rec["status"] == "failed" and rec["returncode"] == 3
    assert main(["--config", "pipe.yaml", "--dry-run"]) == 0
    assert "previous run failed (exit status 3)" in capsys.readouterr().out


OVERWRITE = """
vars: {rho: 0.9}
stages:
  - {name: a, command: fit, config: recipe.yaml, dir: runs/a}
  - name: gen
    command: generate
    dir: runs/gen
    args: {fake.out: runs/store, fake.refuse_other: true, teacher: "${a.best}", rho: "${rho}"}
    outputs: {store: runs/store}
    overwrite: true
  - {name: s, command: fit, config: recipe.yaml, dir: runs/s, args: {data.store: "${gen.store}"}}
"""


def test_overwrite_replaces_outputs_only_when_the_stage_runs_anew(fake, capsys) -> None:
    Path("pipe.yaml").write_text(OVERWRITE)
    assert main(["--config", "pipe.yaml"]) == 0
    marker = Path("runs/store/extra")
    marker.write_text("made by the first run")
    capsys.readouterr()
    assert main(["--config", "pipe.yaml", "--vars.rho", "0.8", "--dry-run"]) == 0
    assert "[2/3] gen  run         config changed: rho 0.9 -> 0.8; replaces runs/store" in capsys.readouterr().out
    n = len(fake())
    assert main(["--config", "pipe.yaml", "--vars.rho", "0.8"]) == 0
    assert ran(fake()[n:]) == ["None", "runs/s"] and not marker.exists()
    # an interrupted run of the same config keeps its outputs (the command resumes its own work)
    rec_path = Path("runs/gen/pipeline/gen.json")
    rec_path.write_text(json.dumps({**json.loads(rec_path.read_text()), "status": "interrupted"}))
    marker.write_text("partial work")
    assert main(["--config", "pipe.yaml", "--vars.rho", "0.8"]) == 0
    assert marker.exists()
    # without overwrite the command refuses a store made with other settings, and the pipeline says so
    Path("pipe.yaml").write_text(OVERWRITE.replace("    overwrite: true\n", ""))
    assert main(["--config", "pipe.yaml", "--vars.rho", "0.7"]) == 2
    assert "runs/store was written with other settings; refusing" in capsys.readouterr().err
    # with overwrite back, the failed attempt (rho 0.7) is known not to have made the store there (rho 0.8)
    Path("pipe.yaml").write_text(OVERWRITE)
    assert main(["--config", "pipe.yaml", "--vars.rho", "0.7", "--dry-run"]) == 0
    assert "previous run failed (exit status 2); the outputs there were made with another config or inputs; " in (
        capsys.readouterr().out
    )
    assert main(["--config", "pipe.yaml", "--vars.rho", "0.7"]) == 0
    assert not marker.exists()


def test_a_stage_runs_in_one_pipeline_at_a_time(fake, capsys) -> None:
    import fcntl

    Path("runs/a/pipeline").mkdir(parents=True)
    with open("runs/a/pipeline/a.lock", "w") as held:  # another pipeline is running stage a
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        assert main(["--config", "pipe.yaml"]) == 2
    assert "stage 'a' is being run by another process (pid 4242)" in capsys.readouterr().err
    assert fake() == []
    assert main(["--config", "pipe.yaml", "--only", "a"]) == 0  # released: it runs


# seed 0's pipeline names seed 1's baseline "guide" (aikd_fashion_mnist_overfit.yaml); seed 1's names it "baseline"
SEEDED = """
vars: {seed: 0, guide_seed: 1}
stages:
  - name: baseline
    command: fit
    config: recipe.yaml
    dir: runs/seed${seed}/baseline
    args: {seed_everything: "${seed}"}
  - name: guide
    command: fit
    config: recipe.yaml
    dir: runs/seed${guide_seed}/baseline
    args: {seed_everything: "${guide_seed}"}
  - name: arm
    command: fit
    config: recipe.yaml
    dir: runs/seed${seed}/arm
    args: {seed_everything: "${seed}", model.teacher: "${guide.best}"}
"""


def test_one_run_named_differently_by_two_pipelines_is_trained_once(fake, capsys) -> None:
    Path("seeded.yaml").write_text(SEEDED)
    assert main(["--config", "seeded.yaml", "--vars.seed", "1", "--vars.guide_seed", "2", "--only", "baseline"]) == 0
    assert ran(fake()) == ["runs/seed1/baseline"]
    capsys.readouterr()
    assert main(["--config", "seeded.yaml"]) == 0  # seed 0: its "guide" is seed 1's "baseline", already done
    assert lines(capsys.readouterr().out) == {"baseline": "done", "guide": "skipped", "arm": "done"}
    assert ran(fake()) == ["runs/seed1/baseline", "runs/seed0/baseline", "runs/seed0/arm"]
    # and the other way round: seed 2's guide stage trains seed 3's baseline, seed 3's pipeline then skips it
    assert main(["--config", "seeded.yaml", "--vars.seed", "2", "--vars.guide_seed", "3", "--only", "guide"]) == 0
    capsys.readouterr()
    assert main(["--config", "seeded.yaml", "--vars.seed", "3", "--vars.guide_seed", "4", "--only", "baseline"]) == 0
    assert lines(capsys.readouterr().out) == {"baseline": "skipped"}
    # another config in the same folder is not the same run: it runs (here: another max_epochs)
    assert main(["--config", "seeded.yaml", "--vars.seed", "2", "--vars.guide_seed", "3", "--only", "baseline"]) == 0
    capsys.readouterr()
    Path("recipe.yaml").write_text(RECIPE.replace("max_epochs: 1", "max_epochs: 2"))
    assert main(["--config", "seeded.yaml", "--vars.seed", "1", "--vars.guide_seed", "2", "--only", "guide"]) == 0
    assert lines(capsys.readouterr().out) == {"guide": "done"}


@contextlib.contextmanager
def _held(path: str, holder: str):
    """Hold ``path``'s lock as another pipeline does while its stage runs (the file names its pid and stage)."""
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(holder)
        held.flush()
        yield


def test_one_stage_at_a_time_runs_in_a_run_folder_whatever_its_name_or_command(fake, capsys) -> None:
    """Issue 26 item 11: the run folder is locked, not the stage name, for fit, test and tool stages alike."""
    Path("seeded.yaml").write_text(SEEDED)
    with _held("runs/seed1/baseline/pipeline/run.lock", "4243 baseline"):  # seed 1's pipeline fits its baseline
        assert main(["--config", "seeded.yaml", "--only", "guide"]) == 2
    err = capsys.readouterr().err
    assert (
        "run folder 'runs/seed1/baseline' is in use by another pipeline (pid 4243, stage 'baseline'); "
        "stage 'guide' cannot run there at the same time" in err
    )
    assert fake() == []
    # a test stage joins its fit's folder: another pipeline testing or fitting there keeps it out
    assert main(["--config", "pipe.yaml", "--only", "a,b"]) == 0
    n = len(fake())
    with _held("runs/b/pipeline/run.lock", "4244 other_test"):
        assert main(["--config", "pipe.yaml", "--only", "t"]) == 2
    err = capsys.readouterr().err
    assert "run folder 'runs/b' is in use by another pipeline (pid 4244, stage 'other_test')" in err
    assert "stage 't' cannot run there" in err and len(fake()) == n
    # a tool stage's folder too
    Path("gen.yaml").write_text("stages: [{name: g, command: generate, dir: runs/g, args: {fake.out: runs/g/o}}]")
    with _held("runs/g/pipeline/run.lock", "4245 g2"):
        assert main(["--config", "gen.yaml"]) == 2
    assert "run folder 'runs/g' is in use by another pipeline (pid 4245, stage 'g2')" in capsys.readouterr().err
    assert main(["--config", "pipe.yaml", "--only", "t"]) == 0 and main(["--config", "gen.yaml"]) == 0  # released
    assert Path("runs/b/pipeline/run.lock").read_text() == f"{os.getpid()} t"  # who held it last


def test_a_stage_that_does_not_write_its_declared_output_fails(fake, capsys) -> None:
    Path("pipe.yaml").write_text("stages: [{name: g, command: generate, dir: runs/g, outputs: {store: runs/store}}]")
    assert main(["--config", "pipe.yaml"]) == 1
    assert "stage 'g' exited 0 but did not write runs/store; log: runs/g/pipeline/g.log" in capsys.readouterr().err
    assert json.loads(Path("runs/g/pipeline/g.json").read_text())["status"] == "failed"


def test_a_killed_pipeline_continues_where_it_stopped(fake, tmp_path: Path, monkeypatch, capsys) -> None:
    """SIGKILL the pipeline during b: b's kdl gets SIGTERM (parent-death signal) and stops; the rerun skips a,
    resumes b with --ckpt_path last from its saved epoch, and runs the rest."""
    Path("pipe.yaml").write_text(PIPELINE.replace("epochs: 2}", "epochs: 40}"))
    monkeypatch.setenv("FAKE_KDL_SLEEP", "0.1")
    # a forked copy of this process (kdl already imported) is the pipeline process
    proc = multiprocessing.get_context("fork").Process(target=main, args=(["--config", "pipe.yaml"],))
    proc.start()
    last = tmp_path / "runs/b/checkpoints/last.ckpt"
    deadline = time.monotonic() + 120
    while not (last.exists() and json.loads(last.read_text() or "{}").get("epoch", -1) >= 2):
        assert proc.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.join()
    monkeypatch.delenv("FAKE_KDL_SLEEP")
    b_pid = next(e for e in fake() if e["root"] == "runs/b")["pid"]
    deadline = time.monotonic() + 30
    while _alive(b_pid):  # the orphaned stage stops on its own
        assert time.monotonic() < deadline, "the stage outlived its pipeline"
        time.sleep(0.05)
    stopped_at = json.loads(last.read_text())["epoch"]
    assert 2 <= stopped_at < 39
    assert json.loads((tmp_path / "runs/b/pipeline/b.json").read_text())["status"] == "running"
    n = len(fake())

    assert main(["--config", "pipe.yaml", "--dry-run"]) == 0
    assert "resumes from runs/b/checkpoints/last.ckpt" in capsys.readouterr().out
    assert main(["--config", "pipe.yaml"]) == 0
    assert lines(capsys.readouterr().out) == {"a": "skipped", "b": "done", "c": "done", "d": "done", "t": "done"}
    rerun = fake()[n:]
    assert ran(rerun) == ["runs/b", "runs/c", "runs/d", "runs/b:test"]
    assert rerun[0]["resumed_from"] == stopped_at
    rec = json.loads((tmp_path / "runs/b/pipeline/b.json").read_text())
    assert rec["status"] == "done" and rec["attempts"] == 2 and rec["command"].endswith("--ckpt_path last")


def _exit_with(argv: list[str]) -> None:
    sys.exit(main(argv))


def test_ctrl_c_stops_the_stage_and_the_background_server(fake, tmp_path: Path, monkeypatch) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    Path("pipe.yaml").write_text(f"""
stages:
  - {{name: server, command: serve-teacher, dir: runs/srv, args: {{port: {port}}}, background: true,
     ready: {{url: "{url}"}}}}
  - {{name: long, command: fit, config: recipe.yaml, dir: runs/long, args: {{trainer.max_epochs: 1000}}}}
""")
    monkeypatch.setenv("FAKE_KDL_SLEEP", "0.05")
    proc = multiprocessing.get_context("fork").Process(target=_exit_with, args=(["--config", "pipe.yaml"],))
    proc.start()
    last, deadline = tmp_path / "runs/long/checkpoints/last.ckpt", time.monotonic() + 60
    while not last.exists():
        assert proc.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    assert _answers(url)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(timeout=60)
    assert proc.exitcode == 128 + signal.SIGINT
    assert not _answers(url)  # the server was stopped
    stage_pid = next(e for e in fake() if e["command"] == "fit")["pid"]
    assert not _alive(stage_pid)
    rec = json.loads((tmp_path / "runs/long/pipeline/long.json").read_text())
    assert rec["status"] == "interrupted" and rec["returncode"] == -signal.SIGTERM


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_a_background_stage_serves_the_later_stages_and_is_stopped(fake, capsys) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    Path("pipe.yaml").write_text(f"""
stages:
  - name: server
    command: serve-teacher
    dir: runs/server
    args: {{port: {port}}}
    background: true
    ready: {{url: "{url}", timeout: 60}}
  - name: student
    command: fit
    config: recipe.yaml
    dir: runs/student
    args: {{fake.fetch: "${{server.url}}"}}
  - name: broken
    command: test
    config: recipe.yaml
    dir: runs/student
    args: {{fake.fetch: "${{server.url}}", fake.fail: 4}}
""")
    assert main(["--config", "pipe.yaml"]) == 4  # the last stage fails: the server is stopped all the same
    out = capsys.readouterr().out
    assert lines(out) == {"server": "stopped", "student": "done", "broken": "failed"}
    assert "started" in out and "ready in" in out
    assert "fetched " + url.rstrip("/") + " 200" in Path("runs/student/pipeline/student.log").read_text()  # the base
    assert not _answers(url)
    # everything after the server done: the server is not started at all
    Path("pipe.yaml").write_text(Path("pipe.yaml").read_text().replace(", fake.fail: 4", ""))
    assert main(["--config", "pipe.yaml"]) == 0
    assert lines(capsys.readouterr().out)["broken"] == "done"
    assert main(["--config", "pipe.yaml", "--dry-run"]) == 0
    assert lines(capsys.readouterr().out) == {"server": "idle", "student": "skip", "broken": "skip"}
    assert main(["--config", "pipe.yaml"]) == 0
    assert "server" not in lines(capsys.readouterr().out)


def test_only_starts_the_background_stages_it_selects_or_that_its_stages_read(fake, capsys) -> None:
    ports = _free_port(), _free_port()
    Path("pipe.yaml").write_text(f"""
stages:
  - {{name: soft, command: serve-teacher, dir: runs/soft, args: {{port: {ports[0]}}}, background: true,
     ready: {{url: "http://127.0.0.1:{ports[0]}/", timeout: 60}}}}
  - {{name: hard, command: serve-teacher, dir: runs/hard, args: {{port: {ports[1]}}}, background: true,
     ready: {{url: "http://127.0.0.1:{ports[1]}/", timeout: 60}}}}
  - {{name: student, command: fit, config: recipe.yaml, dir: runs/student, args: {{fake.fetch: "${{soft.url}}"}}}}
""")
    # the selection names neither server: the one the student reads starts all the same, the other does not
    assert main(["--config", "pipe.yaml", "--only", "student", "--dry-run"]) == 0
    assert lines(capsys.readouterr().out) == {"soft": "start", "hard": "off", "student": "run"}
    assert main(["--config", "pipe.yaml", "--only", "student"]) == 0
    assert lines(capsys.readouterr().out) == {"soft": "stopped", "student": "done"}
    assert not Path("runs/hard/pipeline/hard.log").exists()
    # a selected server starts (before the first later stage that runs) although no stage reads it
    assert main(["--config", "pipe.yaml", "--only", "hard,student", "--force"]) == 0
    assert lines(capsys.readouterr().out) == {"soft": "stopped", "hard": "stopped", "student": "done"}


def test_a_background_stage_that_is_never_ready_fails_with_its_log(fake, capsys) -> None:
    port = _free_port()
    Path("pipe.yaml").write_text(f"""
stages:
  - {{name: server, command: serve-teacher, dir: runs/srv, args: {{port: {port}}}, background: true,
     ready: {{file: never, timeout: 1}}}}
  - {{name: after, command: fit, config: recipe.yaml, dir: runs/after}}
""")
    assert main(["--config", "pipe.yaml"]) == 1
    assert "background stage 'server': never not ready after 1 s; log: runs/srv/pipeline/server.log" in (
        capsys.readouterr().err
    )
    assert ran(fake()) == ["None"]  # the server started (the fake kdl has no run folder); 'after' did not
    assert not _answers(f"http://127.0.0.1:{port}/")  # and it was stopped
    # a background command that exits before it is ready
    Path("pipe.yaml").write_text(Path("pipe.yaml").read_text().replace("serve-teacher", "generate"))
    assert main(["--config", "pipe.yaml"]) == 1
    assert "background stage 'server' exited with exit status 0 before never was ready" in capsys.readouterr().err


def test_references_variables_and_types_resolve() -> None:
    steps = resolve(
        [
            {
                "name": "t",
                "command": "fit",
                "dir": "${root}/t",
                "args": {"seed_everything": "${seed}", "x": "$${keep}"},
            },
            {
                "name": "gen",
                "command": "generate",
                "dir": "${root}/gen",
                "args": ["--teacher", "${t.best}", "--rho", 0.9, "--flag", True],
                "outputs": {"store": "${root}/gen/store"},
            },
            {
                "name": "srv",
                "command": "serve-teacher",
                "dir": "${root}/srv",
                "args": {"ckpt": "${t.last}", "port": "${port}"},
                "background": True,
                "ready": {"url": "http://127.0.0.1:${port}/health"},
            },
            {"name": "s", "command": "fit", "dir": "r/s", "args": {"data.store": "${gen.store}", "url": "${srv.url}"}},
        ],
        {"root": "runs/x", "seed": 3, "port": 8765, "items": [1, 2]},
        tool_commands=("generate", "serve-teacher"),
    )
    t, gen, srv, s = steps
    assert t.argv == ["--seed_everything", "3", "--x", "${keep}", "--trainer.default_root_dir", "runs/x/t"]
    assert t.spec["config"]["seed_everything"] == 3  # a whole-string reference keeps the variable's type
    assert t.artifacts == {
        "dir": "runs/x/t",
        "best": "runs/x/t/checkpoints/best.ckpt",
        "last": "runs/x/t/checkpoints/last.ckpt",
    }
    assert gen.argv == ["--teacher", "runs/x/t/checkpoints/best.ckpt", "--rho", "0.9", "--flag", "true"]
    assert gen.refs == ["t.best"] and gen.artifacts["store"] == "runs/x/gen/store"
    assert gen.required == ["runs/x/gen/store"]
    assert srv.ready == Ready(url="http://127.0.0.1:8765/health") and srv.artifacts["url"] == "http://127.0.0.1:8765"
    assert s.refs == ["gen.store", "srv.url"]
    assert s.state_path == "r/s/pipeline/s.json" and s.log_path == "r/s/pipeline/s.log"


def test_a_section_file_named_by_the_recipe_is_part_of_the_stage_hash(tmp_path: Path) -> None:
    """``data: data.yaml`` in a recipe: editing data.yaml changes the hash (the stage reruns), as editing the
    recipe itself does; overrides into the section still apply."""
    (tmp_path / "data.yaml").write_text("class_path: FashionMNISTDataModule\ninit_args: {batch_size: 32}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {class_path: M}\ndata: data.yaml  # the folder's data section\n")
    stage = {"name": "s", "command": "fit", "config": str(recipe), "dir": str(tmp_path / "s"),
             "args": {"data.init_args.train_size": 100}}  # fmt: skip

    def step():
        return resolve([stage], {})[0]

    first = step()
    assert first.spec["config"]["data"]["init_args"] == {"batch_size": 32, "train_size": 100}
    assert step().config_hash == first.config_hash  # stable
    (tmp_path / "data.yaml").write_text("class_path: FashionMNISTDataModule\ninit_args: {batch_size: 64}\n")
    assert step().config_hash != first.config_hash


def test_folder_hashes_cover_every_file_but_the_pipeline_records(tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "store"
    (store / "shards").mkdir(parents=True)
    (store / "pipeline").mkdir()
    (store / "manifest.json").write_bytes(b'{"n": 2}')
    (store / "shards" / "0.bin").write_bytes(b"\x00\x01")
    (store / "pipeline" / "generate.json").write_text("{}")
    manifest, shard = hashlib.sha256(b'{"n": 2}').hexdigest(), hashlib.sha256(b"\x00\x01").hexdigest()
    expected = hashlib.sha256(("manifest.json\0" + manifest + "\nshards/0.bin\0" + shard).encode()).hexdigest()
    hashes = pipeline.Hashes()
    assert hashes.sha(str(store)) == expected
    (store / "pipeline" / "generate.json").write_text('{"status": "done"}')  # the record is not content
    assert pipeline.Hashes().sha(str(store)) == expected
    (store / "shards" / "0.bin").write_bytes(b"\x00\x02")
    assert pipeline.Hashes().sha(str(store)) != expected
    # an unchanged file (same size and mtime) is not read again
    entry = hashes.entry(str(store / "manifest.json"))
    monkeypatch.setattr(pipeline.state, "file_sha", lambda path: pytest.fail(f"{path} was read again"))
    assert hashes.entry(str(store / "manifest.json")) == entry
    assert pipeline.Hashes().sha(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("stages", "variables", "message"),
    [
        ([{"name": "a", "command": "fit", "dir": "x", "args": {"k": "${nope}"}}], {}, "${nope} is not a variable"),
        (
            [{"name": "a", "command": "fit", "dir": "x", "args": {"k": "${b.best}"}}, {"name": "b", "command": "fit"}],
            {},
            "names stage 'b', which comes later",
        ),
        (
            [
                {"name": "a", "command": "test", "dir": "x"},
                {"name": "b", "command": "fit", "dir": "y", "args": {"k": "${a.best}"}},
            ],
            {},
            "stage 'a' has no 'best' (it has: dir)",
        ),
        ([{"name": "g", "command": "generate"}], {}, "stage 'g' (kdl generate) needs dir:"),
        ([{"name": "f", "command": "fit"}], {}, "needs trainer.default_root_dir in its recipe, or dir:"),
        ([{"name": "a", "command": "fit", "dir": "x"}, {"name": "a", "command": "test", "dir": "x"}], {}, "unique"),
        (
            [{"name": "a", "command": "fit", "dir": "x"}, {"name": "b", "command": "fit", "dir": "x"}],
            {},
            "already fits",
        ),
        ([{"name": "a", "command": "train", "dir": "x"}], {}, "command 'train' is not a kdl command"),
        (
            [{"name": "a", "command": "fit", "dir": "x", "config": "missing.yaml"}],
            {},
            "recipe 'missing.yaml' not found",
        ),
        ([{"name": "s", "command": "generate", "dir": "x", "background": True}], {}, "needs ready:"),
        ([{"name": "a", "command": "fit", "dir": "x", "outputs": {"best": "b"}}], {}, "reserved"),
        ([{"name": "a", "command": "fit", "dir": "${a}"}], {"a": 1}, "a variable has the same name"),
        ([{"name": "g", "command": "generate", "dir": "x", "overwrite": True}], {}, "overwrite needs outputs"),
        (
            [{"name": "g", "command": "generate", "dir": "x/g", "overwrite": True, "outputs": {"o": "x"}}],
            {},
            "holds the run folder",
        ),
        ([], {}, "no stages"),
    ],
)
def test_bad_pipelines_are_named(stages: list, variables: dict, message: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pipeline.ConfigError, match=None) as e:
        resolve(stages, variables, tool_commands=("generate",))
    assert message in str(e.value)


def test_an_unknown_stage_key_is_a_parse_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text("stages:\n  - {name: a, command: fit, dir: x, max_epochs: 3}\n")
    assert main(["--config", "p.yaml"]) == 2
    assert "max_epochs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- real kdl stages
@pytest.mark.slow
def test_a_real_fit_stage_runs_once(tmp_path: Path, monkeypatch, capsys) -> None:
    """A real ``kdl fit`` process (tinynet, one epoch) writes the run folder it writes alone; the rerun skips it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(pipeline.LAUNCHER_ENV, raising=False)
    Path("p.yaml").write_text(f"""
stages:
  - name: student
    command: fit
    config: {RECIPES / "digits/student.yaml"}
    dir: runs/student
    args: {{model.init_args.net: tinynet, trainer.max_epochs: 1, data.init_args.train_size: 100}}
""")
    assert main(["--config", "p.yaml"]) == 0, capsys.readouterr()
    assert lines(capsys.readouterr().out) == {"student": "done"}
    assert Path("runs/student/checkpoints/best.ckpt").is_file()
    assert list(Path("runs/student/lightning_logs").glob("version_0/config.yaml"))
    log = Path("runs/student/pipeline/student.log").read_text()
    assert "kdl fit --config" in log and "`Trainer.fit` stopped: `max_epochs=1` reached" in log
    assert main(["--config", "p.yaml"]) == 0
    assert lines(capsys.readouterr().out) == {"student": "skipped"}


def _digits_pipeline_args(root: Path) -> list[str]:
    return ["--config", str(RECIPES / "pipelines/digits_kd.yaml"), "--vars.root", str(root)]


def test_shipped_digits_pipeline_resolves(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root, like every recipe's
    steps, _ = pipeline.load(_digits_pipeline_args(tmp_path / "r"))
    assert [s.name for s in steps] == ["teacher", "student", "blkd", "test_teacher", "test_student", "test_blkd"]
    assert steps[2].refs == ["teacher.best"] and steps[5].refs == ["blkd.best", "teacher.best"]
    # every fit, the teacher's too, is tested on the held-out split
    assert [s.refs[0] for s in steps if s.command == "test"] == ["teacher.best", "student.best", "blkd.best"]
    assert steps[2].spec["config"]["model"]["init_args"]["teacher"] == str(tmp_path / "r/teacher/checkpoints/best.ckpt")
    assert steps[2].dir == str(tmp_path / "r/seed0/blkd") and steps[2].spec["config"]["seed_everything"] == 0


SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml") if "stages" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_pipeline_resolves(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    stages = yaml.safe_load(path.read_text())["stages"]
    configs = [c for s in stages for c in ([s["config"]] if isinstance(s.get("config"), str) else s.get("config", []))]
    missing = [c for c in configs if not (REPO / c).exists()]
    if missing:
        pytest.skip(f"stage recipes not there yet: {', '.join(sorted(set(missing)))}")
    steps, _ = pipeline.load(["--config", str(path)])
    assert len(steps) == len(stages) and any(s.refs for s in steps)
    if path.parent.name != "pipelines":  # a method's pipeline (its stage recipes are parsed by test_cli):
        for stage, step in zip(stages, steps):  # each override replaces a value its recipe has (no typo'd key)
            if not stage.get("config"):  # a tool stage given by its flags alone (serve-teacher): no recipe to check
                continue
            merged: dict = {}
            for c in [stage["config"]] if isinstance(stage.get("config"), str) else stage.get("config", []):
                merged = pipeline._deep_merge(merged, yaml.safe_load((REPO / c).read_text()))
            for key in stage.get("args") or {}:
                if key not in ("ckpt_path", "seed_everything") and not key.startswith("trainer."):
                    parent, _, leaf = key.rpartition(".")
                    node = pipeline._get_dotted(merged, parent) if parent else merged
                    assert isinstance(node, dict) and leaf in node, f"stage {step.name}: {key} not in its recipe"
        return
    for step in steps:  # every stage's command line parses (ckpt_path left out: kdl reads that file while parsing)
        argv = list(step.argv)
        if "--ckpt_path" in argv:
            del argv[argv.index("--ckpt_path") : argv.index("--ckpt_path") + 2]
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                status = kdl_main([step.command, *argv, "--print_config"])
            except SystemExit as e:  # --print_config exits after printing
                status = int(e.code or 0)
        assert status == 0, step.shown()


CGANKD_STAGES = ("teacher", "student", "cgan", "dr", "generate", "student_cgankd")


@pytest.mark.parametrize("setting", ["digits", "fashion_mnist", "rotated"])
def test_cgankd_pipelines_parse(setting: str, monkeypatch) -> None:
    path = RECIPES / "cgankd" / setting / "pipeline.yaml"
    raw = yaml.safe_load(path.read_text())
    names = [s["name"] for s in raw["stages"]]
    kd = "student_cgankd_fitnet" if setting == "rotated" else "student_cgankd_blkd"  # BLKD is for classes only
    assert names[: len(CGANKD_STAGES) + 1] == [*CGANKD_STAGES, kd] and names[-1].startswith("test")
    # every stage's recipe is one of the setting's own files, and every fit stage is tested by a test stage
    configs = [c for s in raw["stages"] for c in ([s["config"]] if isinstance(s["config"], str) else s["config"])]
    assert {Path(c).parent.name for c in configs} == {setting}
    shared = {"teacher", "cgan", "dr"}
    fitted = {s["dir"] for s in raw["stages"] if s["command"] == "fit" and s["name"] not in shared}
    tested = {s["dir"] for s in raw["stages"] if s["command"] == "test"}
    teacher = next(s["dir"] for s in raw["stages"] if s["name"] == "teacher")
    assert tested - {teacher} == fitted  # the teacher may be tested too (the digits toy's test_teacher)
    monkeypatch.chdir(REPO)
    steps, _ = pipeline.load(["--config", str(path)])
    by = {s.name: s for s in steps}
    assert {"generate.store", "student.best"} <= set(by["student_cgankd"].refs)
    assert {"cgan.last", "dr.best", "teacher.best"} <= set(by["generate"].refs)
    assert by["generate"].overwrite and by["generate"].artifacts["store"] == f"runs/cgankd/{setting}/store"
    if setting != "digits":  # Fig. 9's ablations are stages (the retired evidence driver ran them by hand)
        assert {"generate_no_m1", "student_cgankd_no_m1", "student_cgankd_no_m2"} <= set(by)
        assert "generate_no_m1.store" in by["student_cgankd_no_m1"].refs


@pytest.mark.slow
def test_digits_pipeline_runs_then_skips_everything(tmp_path: Path, monkeypatch, capsys) -> None:
    """The shipped toy pipeline at a toy size (~1-2 min on 1 thread), then again: every stage skipped."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(pipeline.LAUNCHER_ENV, raising=False)
    args = [*_digits_pipeline_args(tmp_path / "r"), "--vars.epochs", "2", "--vars.train_size", "300"]
    assert main(args) == 0
    assert set(lines(capsys.readouterr().out).values()) == {"done"}
    assert "test/acc1" in (tmp_path / "r/seed0/blkd/pipeline/test_blkd.log").read_text()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert set(lines(out).values()) == {"skipped"} and "0 stage(s) run, 6 skipped" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "stage" not in ln]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == [
        "teacher",
        "student",
        "blkd",
        "test_teacher",
        "test_student",
        "test_blkd",
    ]
    assert all("test/acc1" in r for r in rows[3:]) and all("best val/acc1" in r for r in rows[:3])
    plots = out[out.index("Plots:") :]
    assert plots.count("curves.png") == 3 and plots.count("reliability.png") == 3
    # another seed: new student folders, the same teacher
    assert main([*args, "--vars.seed", "1", "--dry-run"]) == 0
    plan = lines(capsys.readouterr().out)
    assert plan == {"teacher": "skip", "student": "run", "blkd": "run", "test_teacher": "skip"} | {
        "test_student": "run",
        "test_blkd": "run",
    }


@pytest.mark.slow
def test_a_killed_real_fit_stage_resumes_from_last_ckpt(tmp_path: Path, monkeypatch, capsys) -> None:
    """SIGTERM to a real pipeline while it trains: kdl fit saves last.ckpt and exits; the rerun resumes it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(pipeline.LAUNCHER_ENV, raising=False)
    Path(tmp_path / "p.yaml").write_text(f"""
stages:
  - name: student
    command: fit
    config: {RECIPES / "digits/student.yaml"}
    dir: {tmp_path}/student
    args: {{model.init_args.net: tinynet, trainer.max_epochs: 60, data.init_args.train_size: 200,
            trainer.enable_progress_bar: false}}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kd_lightning.cli", "pipeline", "--config", str(tmp_path / "p.yaml")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = tmp_path / "student/checkpoints/last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "interrupted" in out and "run the same command again to continue" in out
    from kd_lightning.checkpoints import load_checkpoint

    stopped = load_checkpoint(last)["global_step"]
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "p.yaml"]) == 0
    assert lines(capsys.readouterr().out) == {"student": "done"}
    log = (tmp_path / "student/pipeline/student.log").read_text()
    assert "--ckpt_path last" in log and "Restoring states from the checkpoint path" in log
    assert load_checkpoint(last)["global_step"] > stopped
    rec = json.loads((tmp_path / "student/pipeline/student.json").read_text())
    assert rec["attempts"] == 2 and rec["status"] == "done"


def test_the_plots_a_stage_writes_into_its_declared_outputs_are_listed(fake, capsys) -> None:
    """A store's grids sit in the store folder (a declared output), not in the stage's run folder: listed too."""
    Path("pipe.yaml").write_text(
        "stages: [{name: g, command: generate, dir: runs/g, outputs: {store: runs/store},"
        " args: {fake.touch: runs/store/grids/kept.png}}]"
    )
    assert main(["--config", "pipe.yaml"]) == 0
    assert "Plots:\n  runs/store/grids/kept.png\n" in capsys.readouterr().out
