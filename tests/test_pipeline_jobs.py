"""``kdl pipeline --jobs N``: independent stages side by side, dependants after what they use, failures and Ctrl-C.

No test measures time: stage ``a`` waits for a file that stage ``b`` writes, which only works when both run at
once (with one job it waits in vain and fails after its own timeout, so nothing hangs).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from kd_lightning.pipeline import dependencies, main, resolve
from kd_lightning.pipeline.report import Console
from tests.test_pipeline import _alive, lines, ran, use_fake_kdl

# a waits for b's file; c uses a.best (and checks it exists when it starts); d uses nothing; t tests c in its folder
JOBS = """
vars: {wait: 60}
stages:
  - name: a
    command: fit
    config: recipe.yaml
    dir: runs/a
    args: {fake.wait_for: runs/b.started, fake.wait_s: "${wait}"}
  - {name: b, command: fit, config: recipe.yaml, dir: runs/b, args: {fake.touch: runs/b.started}}
  - name: c
    command: fit
    config: recipe.yaml
    dir: runs/c
    args: {model.teacher: "${a.best}", fake.needs: runs/a/checkpoints/best.ckpt}
  - {name: d, command: fit, config: recipe.yaml, dir: runs/d}
  - {name: t, command: test, config: recipe.yaml, dir: runs/c, args: {fake.needs: runs/c/checkpoints/best.ckpt}}
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return use_fake_kdl(tmp_path, monkeypatch)


def test_independent_stages_run_side_by_side_and_dependants_wait(fake, capsys) -> None:
    Path("jobs.yaml").write_text(JOBS)
    assert main(["--config", "jobs.yaml", "--jobs", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert lines(out) == {"a": "done", "b": "done", "c": "done", "d": "done", "t": "done"}
    assert "running" in out and "5 stage(s) run, 0 skipped" in out
    order = ran(fake())
    assert order.index("runs/a") < order.index("runs/c") < order.index("runs/c:test")  # each after what it uses
    # the records are those of a run with one job: a rerun with either skips everything
    assert main(["--config", "jobs.yaml", "--jobs", "2"]) == 0
    assert set(lines(capsys.readouterr().out).values()) == {"skipped"}
    assert main(["--config", "jobs.yaml"]) == 0
    assert set(lines(capsys.readouterr().out).values()) == {"skipped"}


def test_one_job_runs_the_file_s_order_so_a_waits_in_vain(fake, capsys) -> None:
    """The same pipeline with the default --jobs 1: a runs alone, b never starts beside it (today's behaviour)."""
    Path("jobs.yaml").write_text(JOBS)
    assert main(["--config", "jobs.yaml", "--vars.wait", "1"]) == 5
    captured = capsys.readouterr()
    assert "waited in vain for runs/b.started" in captured.err
    assert lines(captured.out) == {"a": "failed"} and ran(fake()) == ["runs/a"]


def test_a_failing_stage_stops_its_dependants_and_lets_the_running_ones_finish(fake, capsys) -> None:
    """a fails while b runs: b finishes and is recorded done; c (uses a) never starts; the exit status is a's."""
    Path("jobs.yaml").write_text(
        JOBS.replace(
            'fake.wait_s: "${wait}"}', 'fake.wait_s: "${wait}", fake.then_touch: runs/a.failing, fake.fail: 3}'
        ).replace("{fake.touch: runs/b.started}", "{fake.touch: runs/b.started, fake.wait_for: runs/a.failing}")
    )
    assert main(["--config", "jobs.yaml", "--jobs", "2"]) == 3
    captured = capsys.readouterr()
    assert "stage 'a' failed with exit status 3" in captured.err
    assert lines(captured.out) == {"a": "failed", "b": "done"}
    assert sorted(ran(fake())) == ["runs/a", "runs/b"]
    assert json.loads(Path("runs/b/pipeline/b.json").read_text())["status"] == "done"
    assert json.loads(Path("runs/a/pipeline/a.json").read_text())["status"] == "failed"


def _exit_with(argv: list[str]) -> None:
    import sys

    sys.exit(main(argv))


def test_ctrl_c_stops_every_running_stage_and_the_rerun_resumes_them(fake, tmp_path: Path, monkeypatch, capsys):
    Path("long.yaml").write_text("""
stages:
  - {name: x, command: fit, config: recipe.yaml, dir: runs/x, args: {trainer.max_epochs: 1000}}
  - {name: y, command: fit, config: recipe.yaml, dir: runs/y, args: {trainer.max_epochs: 1000}}
  - {name: z, command: test, config: recipe.yaml, dir: runs/y}
""")
    monkeypatch.setenv("FAKE_KDL_SLEEP", "0.05")
    proc = multiprocessing.get_context("fork").Process(
        target=_exit_with, args=(["--config", "long.yaml", "--jobs", "2"],)
    )
    proc.start()
    lasts = [tmp_path / f"runs/{s}/checkpoints/last.ckpt" for s in "xy"]
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in lasts):  # both train at once
        assert proc.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(timeout=120)
    assert proc.exitcode == 128 + signal.SIGINT
    pids = [e["pid"] for e in fake()]
    assert len(pids) == 2 and not any(_alive(p) for p in pids)
    for s in "xy":
        rec = json.loads((tmp_path / f"runs/{s}/pipeline/{s}.json").read_text())
        assert rec["status"] == "interrupted" and rec["returncode"] == -signal.SIGTERM
    stopped = {s: json.loads(p.read_text())["epoch"] for s, p in zip("xy", lasts)}
    monkeypatch.delenv("FAKE_KDL_SLEEP")
    assert main(["--config", "long.yaml", "--jobs", "2"]) == 0
    assert lines(capsys.readouterr().out) == {"x": "done", "y": "done", "z": "done"}
    rerun = {e["root"]: e["resumed_from"] for e in fake()[2:] if e["command"] == "fit"}
    assert rerun == {"runs/x": stopped["x"], "runs/y": stopped["y"]}


def test_what_waits_for_what(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """References, a shared run folder, a plain input inside an earlier stage's folder, and background stages."""
    monkeypatch.chdir(tmp_path)
    steps = resolve(
        [
            {"name": "a", "command": "fit", "dir": "r/a"},
            {"name": "b", "command": "fit", "dir": "r/b", "args": {"t": "${a.best}"}},
            {"name": "t", "command": "test", "dir": "r/a"},
            {"name": "g", "command": "generate", "dir": "r/g", "inputs": ["r/b/checkpoints/last.ckpt"]},
            {"name": "srv", "command": "serve-teacher", "dir": "r/s", "background": True, "ready": {"file": "x"}},
            {"name": "s", "command": "fit", "dir": "r/x"},
        ],
        {},
        tool_commands=("generate", "serve-teacher"),
    )
    assert dependencies(steps) == {"a": set(), "b": {"a"}, "t": {"a"}, "g": {"b"}, "srv": set(), "s": {"srv"}}


def test_the_live_line_shows_every_running_stage_with_its_progress(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # the line is cut to the terminal's width
    steps = resolve(
        [{"name": "teacher", "command": "fit", "dir": "r/t"}, {"name": "student", "command": "fit", "dir": "r/s"}], {}
    )
    for step, text in zip(steps, ["epoch 3/15 step 20/45", "epoch 1/15"]):
        Path(step.progress_path).parent.mkdir(parents=True)
        Path(step.progress_path).write_text(text + "\n")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    now = time.monotonic()
    Console(steps, out).live([(s, "running", 0.0, now - 5) for s in steps])
    assert out.getvalue() == "\r\033[Krunning 2: teacher 5 s epoch 3/15 step 20/45 | student 5 s epoch 1/15"
    out = Terminal()
    Console(steps, out).live([(steps[0], "resuming", 0.0, now - 5)])  # one stage: its own line, as with one job
    assert out.getvalue() == "\r\033[K[1/2] teacher  resuming    5 s  epoch 3/15 step 20/45"
