"""Scale-out through Lightning: ``kdl fit`` under DDP on two CPU processes (gloo).

Two ranks with batch 32 each see the same number of images per step as one process with batch 64;
the resumable sampler shards every epoch by rank (so an epoch has half the steps per rank), and the
validation accuracy matches the single-process run within a few points (the runs are not
identical: BatchNorm statistics are per rank and the order of samples within a step differs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.checkpoints import load_checkpoint
from tests.helpers import DIGITS_STUDENT, QUIET_TRAINER, REPO

RECIPE = DIGITS_STUDENT
EPOCHS = 6
COMMON = [
    "--config",
    str(RECIPE),
    "--trainer.max_epochs",
    str(EPOCHS),
    "--trainer.accelerator",
    "cpu",
    *QUIET_TRAINER,
    "--model.init_args.lr_scheduler.init_args.T_max",
    str(EPOCHS),
]


def run_kdl(root: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kd_lightning.cli", "fit", *COMMON, "--trainer.default_root_dir", str(root), *args],
        cwd=root.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(root / "checkpoints" / "last.ckpt")
    state = next(v for k, v in ckpt["callbacks"].items() if "KDCheckpoint" in k)
    return {"global_step": ckpt["global_step"], "best": float(state["best_model_score"])}


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path: Path) -> None:
    single = run_kdl(tmp_path / "single", "--trainer.devices", "1", "--data.init_args.batch_size", "64")
    ddp = run_kdl(
        tmp_path / "ddp", "--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.init_args.batch_size", "32"
    )
    # 1,298 training images: 20 steps of 64 per epoch in one process; 649 per rank -> 20 steps of 32 under DDP
    assert single["global_step"] == ddp["global_step"] == EPOCHS * 20
    assert single["best"] > 0.85
    assert abs(single["best"] - ddp["best"]) < 0.05, (single, ddp)
