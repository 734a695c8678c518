"""The notebooks run: every code cell, in order, against tiny checkpoints and fake data (no Jupyter needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch

from tests.conftest import REPO, make_fake_mnist
from tests.helpers import write_teacher

NOTEBOOKS = REPO / "notebooks"


def run_notebook(path: Path) -> dict:
    """Execute the code cells of ``path`` in one namespace (figures go to the Agg backend)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__notebook__"}
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"{path.name}[{i}]", "exec"), namespace)  # noqa: S102
        plt.close("all")
    return namespace


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["explore_student.ipynb"]


def test_explore_student_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for i, name in enumerate(("teacher", "student_nokd", "student_blkd")):
        (runs / name / "checkpoints").mkdir(parents=True)
        torch.manual_seed(i)
        write_teacher(runs / name / "checkpoints" / "best.ckpt", 10, 1, 32, (0.2860,), (0.3530,))
    monkeypatch.setenv("KDL_RUNS", str(runs))
    monkeypatch.setenv("KDL_DATA", str(make_fake_mnist(tmp_path / "data", n_train=100, n_test=40)))
    ns = run_notebook(NOTEBOOKS / "explore_student.ipynb")
    assert set(ns["summary"]) == {"teacher", "student_nokd", "student_blkd"}
    for s in ns["summary"].values():
        assert 0 <= s["top1_error"] <= 100 and s["temperature"] > 0
    assert int(ns["confusion"].sum()) == 40  # every test image once
    teacher_logits = ns["test"]["teacher"][0]
    assert torch.equal(ns["teacher_pred"], teacher_logits.argmax(1))
    assert (runs / "student_blkd_reliability.png").stat().st_size > 1000
