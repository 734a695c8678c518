"""The notebooks: each .ipynb has a jupytext twin (py:percent) with the same cells, and each runs from its twin in
a real Jupyter kernel under papermill (its parameters cell given relative paths, resolved against the project root
the test sets, from another working directory) on tiny artifacts built here, into tmp_path (the committed outputs
stay as they are).

Re-execute a notebook on the real artifacts and update its committed .ipynb (outputs included):

    python -m tests.test_notebooks notebooks/explore_student.py [more.py ...]
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import jupytext
import nbformat
import numpy as np
import pytest
import torch
from jupytext.compare import compare_notebooks

from tests.conftest import REPO, make_fake_mnist
from tests.helpers import write_teacher

NOTEBOOKS = REPO / "notebooks"
PROBE = "__probe__"


def execute(
    source: Path,
    cwd: Path,
    probe: str | None = None,
    parameters: dict[str, Any] | None = None,
    timeout: int | None = 900,
) -> nbformat.NotebookNode:
    """Run the notebook read from ``source`` (its .py twin or the .ipynb) with papermill in a fresh python3 kernel.

    The kernel starts in ``cwd``; ``parameters`` go into a cell after the notebook's ``parameters`` cell.
    ``probe``: code appended as a last cell; what it prints after ``__probe__`` is JSON the test reads back.
    The kernel inherits this process's environment (KDL_PROJECT_ROOT, MPLBACKEND).
    """
    papermill = pytest.importorskip("papermill", reason="pip install -e '.[test]' (papermill runs the notebooks)")
    nb = jupytext.read(source)
    if probe is not None:
        nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint({PROBE!r} + _json.dumps({probe}))"))
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / source.with_suffix(".ipynb").name, Path(tmp) / "executed.ipynb"
        nbformat.write(nb, path)
        papermill.execute_notebook(
            str(path), str(out), parameters=parameters or {}, cwd=str(cwd), kernel_name="python3",
            progress_bar=False, execution_timeout=timeout,
        )  # fmt: skip
        return nbformat.read(out, as_version=4)


def probed(nb: nbformat.NotebookNode) -> dict[str, Any]:
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    return json.loads(text.split(PROBE, 1)[1])


def outputs(nb: nbformat.NotebookNode, mime: str) -> list[Any]:
    return [o.data[mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


@pytest.fixture
def run_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Execute a notebook's text twin with papermill, its project root tmp_path and its working directory another
    folder (tmp_path/elsewhere), so that relative parameters only work when resolved against the project root; the
    committed .ipynb files must not change."""
    # headless: matplotlib's inline backend (Agg rendering to PNG outputs); plain "Agg" would show no figure at all
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KDL_PROJECT_ROOT", str(tmp_path))
    for name in [k for k in os.environ if k.startswith("KDL_") and k != "KDL_PROJECT_ROOT"]:
        monkeypatch.delenv(name)  # the parameters alone say what the notebook reads
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in NOTEBOOKS.iterdir()}

    def run(name: str, probe: str, **parameters: Any) -> nbformat.NotebookNode:
        nb = execute(NOTEBOOKS / f"{name}.py", elsewhere, probe, parameters)
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
        return nb

    yield run
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in NOTEBOOKS.iterdir()} == before


# ---------------------------------------------------------------------------------------------- pairing
def test_every_notebook_has_a_text_twin_with_the_same_cells() -> None:
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.stem for p in notebooks] == ["compare_runs", "explore_samples", "explore_student"]
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == [p.stem for p in notebooks]
    for path in notebooks:
        ipynb, text = jupytext.read(path), jupytext.read(path.with_suffix(".py"))
        assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent", path.name
        compare_notebooks(text, ipynb, fmt="py:percent")  # raises NotebookDifference, naming the first cell
        assert [c.source for c in text.cells] == [c.source for c in ipynb.cells], path.name


def test_a_drifted_twin_is_caught(tmp_path: Path) -> None:
    nb = jupytext.read(NOTEBOOKS / "compare_runs.ipynb")
    text = (NOTEBOOKS / "compare_runs.py").read_text()
    assert "GROUP_BY = " in text
    drifted = jupytext.reads(text.replace("GROUP_BY = ", "GROUP_BY = None or "), "py:percent")
    compare_notebooks(jupytext.reads(text, "py:percent"), nb, fmt="py:percent")  # the twin as committed: equal
    with pytest.raises(Exception, match="GROUP_BY"):
        compare_notebooks(drifted, nb, fmt="py:percent")


def test_committed_notebooks_hold_their_figures_and_stay_small() -> None:
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert path.stat().st_size < 1_600_000, path.name
        assert outputs(nb, "image/png"), f"{path.name}: no figures (execute it: python -m tests.test_notebooks)"
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, path.name


def test_notebooks_use_only_the_public_api() -> None:
    for path in NOTEBOOKS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not node.module.startswith("tests"), f"{path.name} imports {node.module}"
                if node.module.startswith("kd_lightning"):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private and "._" not in node.module, f"{path.name}: {node.module} {private}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                raise AssertionError(f"{path.name} uses a private attribute {node.attr!r}")


# ---------------------------------------------------------------------------------------------- execution
def test_explore_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_notebook) -> None:
    from kd_lightning.data import FashionMNISTDataModule
    from kd_lightning.teachers import FrozenTeacher

    runs = tmp_path / "runs"
    folders = {"teacher": runs / "teacher", "NOKD": runs / "NOKD" / "seed0", "blkd": runs / "blkd"}
    for i, folder in enumerate(folders.values()):
        (folder / "checkpoints").mkdir(parents=True)
        torch.manual_seed(i)
        write_teacher(folder / "checkpoints" / "best.ckpt", 10, 1, 32, (0.2860,), (0.3530,))
    data = make_fake_mnist(tmp_path / "data", n_train=100, n_test=40)
    probe = (
        "{'names': NAMES, 'focus': FOCUS, 'labels': labels.tolist(), 'summary': summary, 'per_class': per_class,"
        " 'pred': {n: test[n].argmax(1).tolist() for n in NAMES}, 'confusion': confusion.tolist(),"
        " 'tsne': {n: list(e.shape) for n, e in embedded.items()}, 'feat_dim': feats['teacher'].shape[1]}"
    )
    nb = run_notebook(  # paths relative to the project root (tmp_path), the kernel running elsewhere
        "explore_student",
        probe,
        TEACHER="runs/teacher/checkpoints/best.ckpt",
        STUDENTS="runs/NOKD/seed0,runs/blkd",
        DATA="data",
        OUT="out",
        TSNE_N=2000,
    )
    got = probed(nb)
    assert got["names"] == ["teacher", "NOKD", "blkd"] and got["focus"] == "blkd"
    labels = np.array(got["labels"])
    assert sorted(labels.tolist()) == sorted((np.arange(40) % 10).tolist())  # every fake test image once

    dm = FashionMNISTDataModule(root=str(data), image_size=32, eval_batch_size=500)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    for name, folder in folders.items():  # the notebook's predictions are these checkpoints' on the test split
        pred = FrozenTeacher.from_checkpoint(folder / "checkpoints" / "best.ckpt")(batch["image"]).argmax(1)
        assert got["pred"][name] == pred.tolist(), name
        assert got["summary"][name]["top1_error"] == pytest.approx(100 * float((pred != batch["label"]).float().mean()))
        expected = [[c, float((pred[labels == c] == c).float().mean()), 4] for c in range(10)]
        assert [[c, pytest.approx(a), n] for c, a, n in got["per_class"][name]] == expected
        assert got["tsne"][name] == [40, 2]
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, np.array(got["pred"]["blkd"])), 1)
    assert got["confusion"] == confusion.tolist()
    assert (tmp_path / "out" / "blkd_reliability.png").read_bytes().startswith(b"\x89PNG")
    # every figure is shown inline: per-class bars, agreement, t-SNE, confusion, reliability, disagreements
    assert len(outputs(nb, "image/png")) == 6


def test_explore_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_notebook) -> None:
    from kd_lightning.sampling import open_store
    from kd_lightning.sampling.generate import generate
    from tests.helpers import cfg, tiny_dr, tiny_gan, tiny_teacher

    parts = {"gan": tiny_gan(tmp_path / "gan.ckpt"), "teacher": tiny_teacher(tmp_path / "teacher.ckpt")}
    parts["dr"] = tiny_dr(tmp_path / "dr.ckpt", parts["gan"], parts["teacher"])
    generate(cfg(parts, tmp_path / "store", per_class=6, keep_rejected=True))
    table = open_store(tmp_path / "store").table()
    probe = (
        "{'kinds': {k: int(m.sum()) for k, m in kinds.items()}, 'cutoffs': cutoffs, 'consistency': consistency,"
        " 'grid': class_grid(kept).tolist(), 'classes': classes}"
    )
    nb = run_notebook("explore_samples", probe, STORE="store", GRID_N=4)
    got = probed(nb)
    accepted, kept, labels = table["accepted"], table["kept"], table["label"]
    assert accepted.sum() == 60 and (~accepted).any()  # 6 per class accepted, and the rejected ones kept too
    assert got["kinds"] == {
        "kept": int(kept.sum()),
        "dropped by the filter": int((accepted & ~kept).sum()),
        "rejected by cDR-RS": int((~accepted).sum()),
    }
    assert got["classes"] == list(range(10))
    assert {int(k): v for k, v in got["cutoffs"].items()} == pytest.approx(
        {int(k): v for k, v in open_store(tmp_path / "store").report["cutoffs"].items()}
    )
    teacher_pred = table["teacher"].argmax(1)
    assert got["consistency"]["kept"] == pytest.approx(
        [float((teacher_pred[kept & (labels == c)] == c).mean()) for c in range(10)]
    )
    grid, images = np.array(got["grid"], np.uint8), open_store(tmp_path / "store").load_images()
    h, w = images.shape[2:]
    for c in range(10):  # row c of the "kept" grid holds the first 4 kept samples of class c, in table order
        for k, i in enumerate(np.flatnonzero(kept & (labels == c))[:4]):
            assert np.array_equal(grid[c * h : (c + 1) * h, k * w : (k + 1) * w], images[i, 0])
    assert len(outputs(nb, "image/png")) == 4  # grids, ratio histograms, error histograms, consistency


def test_compare_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_notebook) -> None:
    from tests.helpers import fake_run

    nokd = [(0.80, [0.5, 0.80, 0.7]), (0.82, [0.5, 0.81, 0.7]), (0.81, [0.5, 0.82, 0.7])]
    for s, (test_acc, curve) in enumerate(nokd):
        fake_run(tmp_path / "NOKD" / f"seed{s}", s, curve, test_acc)
    for s, test_acc in enumerate((0.85, 0.86)):
        fake_run(tmp_path / "BLKD" / f"seed{s}", s, [0.6, 0.7, 0.9 - s / 100], test_acc, ("BLKD",))
    (tmp_path / "empty" / "seed0").mkdir(parents=True)  # a run without logs yet: skipped, named
    probe = "{'summary': summary, 'n': len(runs), 'skipped': skipped, 'metrics': metrics}"
    nb = run_notebook("compare_runs", probe, RUN_DIRS="*/seed*", GROUP_BY="parent")
    got = probed(nb)
    assert got["n"] == 5 and len(got["skipped"]) == 1 and "empty" in got["skipped"][0]
    assert got["metrics"] == ["val/acc1", "val/loss"]  # the fake runs log no ECE or F1
    rows = {line.split(" | ")[0].strip("| "): line for line in got["summary"].splitlines()[2:]}
    nokd_test = [100 * t for t, _ in nokd]
    assert f"{statistics.mean(nokd_test):.2f} ± {statistics.stdev(nokd_test):.2f}" in rows["NOKD"]
    assert "85.50 ± 0.71" in rows["BLKD"] and "| 3 | 0, 1, 2 |" in rows["NOKD"]
    assert len(outputs(nb, "image/png")) == 1 and outputs(nb, "text/markdown") == [got["summary"]]


def test_no_run_found_is_a_clear_error(run_notebook) -> None:
    """compare_runs with nothing to read stops at once, saying where it looked (it used to print "0 runs read")."""
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError) as raised:
        run_notebook("compare_runs", "None", RUN_DIRS="runs/nothing/*")
    assert raised.value.ename == "FileNotFoundError"
    assert "no run read from RUN_DIRS='runs/nothing/*'" in raised.value.evalue and "make demo" in raised.value.evalue


def test_relative_inputs_resolve_against_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not against the working directory: $KDL_PROJECT_ROOT, else the repository holding the package."""
    from kd_lightning.paths import expand, project_root, resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDL_PROJECT_ROOT", raising=False)
    assert project_root() == REPO and resolve("runs/demo") == REPO / "runs/demo"
    assert resolve("/abs/x") == Path("/abs/x")
    monkeypatch.setenv("KDL_PROJECT_ROOT", str(tmp_path / "p"))
    (tmp_path / "p/runs/a").mkdir(parents=True)
    (tmp_path / "p/runs/b").mkdir()
    assert expand("runs/*, runs/a,runs/missing*") == [tmp_path / "p/runs/a", tmp_path / "p/runs/b"]


def test_every_notebook_has_a_parameters_cell() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        cells = [c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, path.name
        assert "/work/" not in path.with_suffix(".py").read_text(), f"{path.name}: a default of another machine"


if __name__ == "__main__":  # re-execute notebooks on the real artifacts and write their paired .ipynb
    for arg in sys.argv[1:]:
        source = Path(arg).with_suffix(".py")
        executed = execute(source, source.parent, timeout=None)  # inference on the full test split: no cell limit
        jupytext.write(executed, source.with_suffix(".ipynb"))
        print(f"{source.with_suffix('.ipynb')}: {source.with_suffix('.ipynb').stat().st_size} bytes")
