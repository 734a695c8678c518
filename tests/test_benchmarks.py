"""The benchmark scripts: each answers ``--help`` (so each imports and parses its options), and the GPU check
script runs end to end in its CPU dry run (so it is known to work the day a GPU is lent)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help(script: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``python -m benchmarks.<script> --help`` prints its usage and exits 0 (in-process: torch is loaded once)."""
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(f"benchmarks.{script}", run_name="__main__", alter_sys=True)
    assert done.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.slow  # ~20 s of CPU: two kdl fits and a teacher checkpoint
def test_gpu_check_dry_run_passes_and_reports_the_peak_share() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "gpu_check: dry run OK" in out
    assert "median ratio kdl/plain img/s" in out and "% of the peak" in out
    # the profile table has the BLKD step's phases, teacher forward included
    for phase in ("data loading", "forward (teacher)", "backward", "optimiser", "**step**"):
        assert phase in out


def test_gpu_check_refuses_without_a_gpu_or_names_the_card() -> None:
    """Without a CUDA device the real check stops with exit 2 and says what to do (never a traceback)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
