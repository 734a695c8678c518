"""``kdl report``: run folders in, a table of mean ± std over seeds and learning curves out."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from kd_lightning.report import draw_curves, group_curves, read_run
from tests.helpers import fake_run


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, list[Path]]:
    return {
        "NOKD": [
            fake_run(tmp_path / "NOKD" / f"seed{s}", s, [0.5, 0.8 + s / 100, 0.7], t)
            for s, t in enumerate((0.80, 0.82, 0.81))
        ],
        "BLKD": [
            fake_run(tmp_path / "BLKD" / f"seed{s}", s, [0.6, 0.7, 0.9 - s / 100], t, ("BLKD",))
            for s, t in enumerate((0.85, 0.86))
        ],
    }


def test_the_selected_epoch_is_the_best_validation_one(runs: dict[str, list[Path]]) -> None:
    run = read_run(runs["NOKD"][1])
    assert run.selected["val/epoch"] == 1 and run.selected["val/acc1"] == pytest.approx(0.81)
    assert run.selected["val/loss"] == pytest.approx(0.19)  # the loss of the same epoch, not its own best
    assert run.test == {"test/acc1": pytest.approx(0.82), "test/loss": pytest.approx(0.3)}
    assert run.seed == 1 and run.method() == "ImageClassifier"
    assert read_run(runs["BLKD"][0]).method() == "DistillModule[BLKD]"


def test_report_table_is_mean_and_std_over_seeds(kdl, runs, tmp_path: Path, capsys) -> None:
    folders = [str(p) for ps in runs.values() for p in ps]
    out = tmp_path / "report" / "table.md"
    assert kdl("report", *folders, "--group-by", "parent", "--out", str(out), "--quiet", "true") == 0
    text = out.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    nokd = [80.0, 82.0, 81.0]
    expected = f"{statistics.mean(nokd):.2f} ± {statistics.stdev(nokd):.2f}"
    assert expected in rows["NOKD"] and "| 3 | 0, 1, 2 |" in rows["NOKD"]
    blkd_val = [90.0, 89.0]
    assert f"{statistics.mean(blkd_val):.2f} ± {statistics.stdev(blkd_val):.2f}" in rows["BLKD"]
    assert (out.parent / "table_val_acc1.png").stat().st_size > 1000
    assert "![val/acc1 per epoch](table_val_acc1.png)" in text
    assert capsys.readouterr().out.strip().startswith("| group")
    # grouping by method or by a config key
    assert kdl("report", *folders, "--metrics", "test/acc1", "--quiet", "true") == 0
    printed = capsys.readouterr().out
    assert "DistillModule[BLKD]" in printed and "ImageClassifier" in printed and "val/acc1" not in printed
    assert kdl("report", *folders, "--group-by", "model.init_args.net", "--quiet", "true") == 0
    assert "| resnet8 | 5 |" in capsys.readouterr().out


def test_curves_are_one_mean_line_per_group_with_its_min_max_band(runs: dict[str, list[Path]]) -> None:
    from matplotlib.figure import Figure

    read = [read_run(p) for ps in runs.values() for p in ps]
    curves = group_curves(read, "parent", "val/acc1")
    assert list(curves) == ["NOKD", "BLKD"]
    assert curves["NOKD"][1] == pytest.approx([80.0, 81.0, 82.0])  # epoch 1 of seeds 0-2, in %
    assert curves["BLKD"][2] == pytest.approx([90.0, 89.0])
    ax = Figure().subplots()
    assert draw_curves(ax, read, "parent", "val/acc1")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["NOKD", "BLKD"]  # one line per group, not one per run
    assert list(lines["NOKD"].get_ydata()) == pytest.approx([50.0, 81.0, 70.0])
    assert len(ax.collections) == 2  # a min-max band per group with several runs
    assert not draw_curves(Figure().subplots(), read, "parent", "val/mae")


def test_report_errors_name_the_folder(kdl, tmp_path: Path, capsys) -> None:
    assert kdl("report", str(tmp_path / "nope")) == 2
    assert "'" + str(tmp_path / "nope") + "' does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert kdl("report", str(tmp_path / "empty")) == 2
    assert "has no lightning_logs/version_*/metrics.csv" in capsys.readouterr().err


def test_a_metric_that_only_some_runs_have_says_how_many(tmp_path: Path) -> None:
    """A run still training (no test version yet) counts in ``runs`` but not in the test mean, which says n=."""
    import shutil

    from kd_lightning.report import table

    fake_run(tmp_path / "m/seed0", 0, [0.5, 0.7], 0.70)
    fake_run(tmp_path / "m/seed1", 1, [0.6, 0.8], 0.80)
    shutil.rmtree(tmp_path / "m/seed1/lightning_logs/version_1")  # not tested yet
    runs = [read_run(tmp_path / "m/seed0"), read_run(tmp_path / "m/seed1")]
    row = table(runs, "parent", ["val/acc1", "test/acc1"]).splitlines()[-1]
    assert row == "| m | 2 | 0, 1 | 75.00 ± 7.07 | 70.00 (n=1) |"


def test_group_by_name_makes_one_row_per_arm_over_seed_folders(tmp_path: Path) -> None:
    """``<root>/seed<k>/<arm>``: ``name`` groups the arms across seed folders (``parent`` would group the seeds)."""
    from kd_lightning.report import table

    fake_run(tmp_path / "seed0/aikd", 0, [0.5, 0.7], 0.70)
    fake_run(tmp_path / "seed1/aikd", 1, [0.6, 0.8], 0.80)
    fake_run(tmp_path / "seed0/baseline", 0, [0.5, 0.6], 0.60)
    runs = [read_run(tmp_path / p) for p in ("seed0/aikd", "seed1/aikd", "seed0/baseline")]
    rows = table(runs, "name", ["test/acc1"]).splitlines()[2:]
    assert rows == ["| aikd | 2 | 0, 1 | 75.00 ± 7.07 |", "| baseline | 1 | 0 | 60.00 |"]


def set_config(run: Path, **init_args: object) -> Path:
    """Change model init_args in every config.yaml of a fake run."""
    import yaml

    for cfg in run.glob("lightning_logs/version_*/config.yaml"):
        config = yaml.safe_load(cfg.read_text())
        config["model"]["init_args"].update(init_args)
        cfg.write_text(yaml.safe_dump(config))
    return run


def rows_of(text: str) -> dict[str, str]:
    return {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:] if line.startswith("| ")}


def test_default_grouping_never_averages_different_nets_or_recipes(kdl, tmp_path: Path, capsys) -> None:
    """The demo's teacher (resnet20) and NOKD student (resnet8), both ImageClassifier at seed 0, are two rows; two
    BLKD temperatures are two rows named by T; seeds of one recipe are one row; ``--group_by run``: a row per run."""
    teacher = set_config(fake_run(tmp_path / "teacher", 0, [0.5, 0.9], 0.9), net="resnet20")
    nokd = fake_run(tmp_path / "student_nokd", 0, [0.5, 0.8], 0.8)
    t2 = [
        set_config(
            fake_run(tmp_path / f"t2s{s}", s, [0.6, 0.8], 0.8, ("BLKD",)),
            kd_losses=[{"class_path": "kd_lightning.losses.BLKD", "init_args": {"T": 2}}],
        )
        for s in (0, 1)
    ]
    t4 = set_config(
        fake_run(tmp_path / "t4", 0, [0.6, 0.7], 0.7, ("BLKD",)),
        kd_losses=[{"class_path": "kd_lightning.losses.BLKD", "init_args": {"T": 4}}],
    )
    folders = [str(p) for p in (teacher, nokd, *t2, t4)]
    assert kdl("report", *folders, "--quiet") == 0
    rows = rows_of(capsys.readouterr().out)
    assert set(rows) == {
        "ImageClassifier resnet20",
        "ImageClassifier resnet8",
        "DistillModule[BLKD] resnet8 (T=2)",
        "DistillModule[BLKD] resnet8 (T=4)",
    }
    assert (
        "| 1 | 0 |" in rows["ImageClassifier resnet20"] and "| 2 | 0, 1 |" in rows["DistillModule[BLKD] resnet8 (T=2)"]
    )
    assert kdl("report", *folders, "--group_by", "run", "--quiet", "true") == 0
    rows = rows_of(capsys.readouterr().out)
    assert list(rows) == folders and all("| 1 |" in r for r in rows.values())
    assert kdl("report", *folders, "--group-by", "run", "--quiet") == 0  # the old spelling still works


def test_folders_that_are_not_runs_are_skipped_and_counted(kdl, tmp_path: Path, capsys) -> None:
    fake_run(tmp_path / "digits" / "student", 0, [0.5, 0.8], 0.8)
    (tmp_path / "digits" / "store").mkdir()  # a sample store beside the runs: no lightning_logs
    (tmp_path / "digits" / "store" / "manifest.json").write_text("{}")
    (tmp_path / "digits" / "notes.md").write_text("x")
    assert kdl("report", *sorted(str(p) for p in (tmp_path / "digits").iterdir()), "--quiet") == 0
    out, err = capsys.readouterr()
    assert "skipped 2 path(s) that are not runs" in err and "store" in err
    assert "| ImageClassifier resnet8 | 1 | 0 |" in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [("", "no numeric val/ or test/ metrics"), ("epoch,step,val/acc1\nx,y,abc\n", "no numeric val/ or test/ metrics")],
    ids=["empty", "non-numeric"],
)
def test_a_metrics_file_without_numbers_is_an_error(kdl, tmp_path: Path, capsys, content: str, expected: str) -> None:
    run = fake_run(tmp_path / "run", 0, [0.5], 0.5)
    import shutil

    shutil.rmtree(run / "lightning_logs" / "version_1")
    (run / "lightning_logs" / "version_0" / "metrics.csv").write_text(content)
    assert kdl("report", str(run), "--quiet") == 2
    err = capsys.readouterr().err
    assert expected in err and "metrics.csv" in err and "None" not in err and "Traceback" not in err


def test_a_malformed_config_yaml_is_one_line(kdl, tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path / "run", 0, [0.5], 0.5)
    (run / "lightning_logs" / "version_0" / "config.yaml").write_text("model: [unclosed\n  net: {")
    assert kdl("report", str(run), "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.yaml' is not valid YAML" in err
    (run / "lightning_logs" / "version_0" / "config.yaml").write_text("- a list\n")
    assert kdl("report", str(run), "--quiet") == 2
    assert "holds a list" in capsys.readouterr().err


def test_out_creates_at_most_one_folder(kdl, tmp_path: Path, capsys, monkeypatch) -> None:
    """``--out`` under a missing folder whose parent is missing too is refused and creates nothing."""
    run = str(fake_run(tmp_path / "run", 0, [0.5, 0.6], 0.5))
    monkeypatch.chdir(tmp_path)
    assert kdl("report", run, "--quiet", "--out", "a/b/report.md") == 2
    assert "folder 'a' does not exist" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert kdl("report", run, "--quiet", "--out", "a/report.md") == 0  # the last level is created
    assert (tmp_path / "a" / "report.md").is_file()
    (tmp_path / "f").write_text("")
    assert kdl("report", run, "--quiet", "--out", "f/report.md") == 2
    assert "'f' is a file" in capsys.readouterr().err


def test_every_name_of_the_report_package_is_one_object_of_its_part() -> None:
    """``kd_lightning.report`` was one module: its names stay importable there, each the object its part defines,
    and matplotlib loads only when a curve is drawn (only ``report/plots.py`` imports it, inside a function)."""
    import importlib

    import kd_lightning.report as report

    parts = [importlib.import_module(f"kd_lightning.report.{m}") for m in ("runs", "groups", "plots", "cli")]
    for name in report.__all__:
        homes = [p for p in parts if name in vars(p) and getattr(p, name) is getattr(report, name)]
        assert homes, name
    sources = {p.__name__: Path(p.__file__).read_text() for p in parts}
    assert [n for n, s in sources.items() if "import matplotlib" in s or "from matplotlib" in s] == [
        "kd_lightning.report.plots"
    ]


def test_a_quoted_glob_pattern_is_expanded_sorted_and_an_empty_one_is_named(kdl, tmp_path: Path, capsys) -> None:
    """``kdl report 'runs/demo/*'`` as a script or a Windows shell passes it: the pattern's matches, sorted."""
    for name, seed in (("b", 1), ("a", 0)):
        set_config(fake_run(tmp_path / "demo" / name, seed, [0.5, 0.8], 0.8), net=f"net_{name}")
    assert kdl("report", str(tmp_path / "demo" / "*"), "--group_by", "run", "--quiet") == 0
    rows = rows_of(capsys.readouterr().out)
    assert list(rows) == [str(tmp_path / "demo" / "a"), str(tmp_path / "demo" / "b")]
    pattern = str(tmp_path / "nothing" / "seed*")
    assert kdl("report", pattern, "--quiet") == 2
    err = capsys.readouterr().err
    assert f"run pattern {pattern!r} matches nothing" in err and err.count("\n") == 1


class _Terminal:
    """A stderr that says it is a terminal (what tqdm writes is kept)."""

    def __init__(self) -> None:
        import io

        self.buffer = io.StringIO()

    def write(self, text: str) -> int:
        return self.buffer.write(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_the_progress_bar_shows_only_on_a_terminal_for_many_runs_and_once(kdl, tmp_path: Path, monkeypatch) -> None:
    few = [str(fake_run(tmp_path / f"r{i:02d}", i, [0.5], 0.5)) for i in range(3)]
    many = few + [str(fake_run(tmp_path / f"r{i:02d}", i, [0.5], 0.5)) for i in range(3, 20)]  # 20: PROGRESS_MIN_RUNS
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert kdl("report", *few) == 0
    assert "reading runs" not in terminal.buffer.getvalue()  # three runs: no bar
    assert kdl("report", *many) == 0
    assert "reading runs" in terminal.buffer.getvalue()
    terminal.buffer = _Terminal().buffer
    assert kdl("report", *many, str(tmp_path / "missing")) == 2  # the error path: the bar ends before the error
    text = terminal.buffer.getvalue()
    assert text.rstrip().splitlines()[-1].startswith("kdl report: error:") and "does not exist" in text
    assert "reading runs" in text.split("kdl report: error:")[0] and "reading runs" not in text.split("error:")[1]
    plain = _Terminal()
    monkeypatch.setattr(plain, "isatty", lambda: False)
    monkeypatch.setattr("sys.stderr", plain)
    assert kdl("report", *many) == 0
    assert "reading runs" not in plain.buffer.getvalue()  # a log file or a pipe: no bar


def _refit(run: Path, val_acc: list[float], test_acc: float | None = None, resume: bool = False) -> None:
    """Another ``kdl fit`` (and ``kdl test``) into ``run``: the next lightning_logs versions."""
    import yaml

    logs = run / "lightning_logs"
    n = len(list(logs.glob("version_*")))
    config = yaml.safe_load((logs / "version_0" / "config.yaml").read_text())
    fit = logs / f"version_{n}"
    fit.mkdir()
    (fit / "config.yaml").write_text(yaml.safe_dump({**config, "ckpt_path": "last" if resume else None}))
    first = 2 if resume else 0
    rows = ["epoch,step,train/loss_epoch,val/acc1,val/loss"]
    rows += [f"{first + e},{10 * e + 9},0.4,{a},{1 - a}" for e, a in enumerate(val_acc)]
    (fit / "metrics.csv").write_text("\n".join(rows) + "\n")
    if test_acc is not None:
        test = logs / f"version_{n + 1}"
        test.mkdir()
        (test / "config.yaml").write_text(yaml.safe_dump({**config, "ckpt_path": str(run / "checkpoints/best.ckpt")}))
        (test / "metrics.csv").write_text(f"epoch,step,test/acc1,test/loss\n0,0,{test_acc},0.2\n")


def test_a_second_fit_into_the_same_folder_replaces_the_first_one(kdl, tmp_path: Path, capsys) -> None:
    """fit + test, then fit + test again: only the newest fit's curves and its own test; a resume continues a fit."""
    run = fake_run(tmp_path / "run", 0, [0.5, 0.7, 0.9], 0.85)  # version_0 fit, version_1 test
    _refit(run, [0.3, 0.6], 0.55)  # version_2 fit, version_3 test
    read = read_run(run)
    assert read.curves["val/acc1"] == [(0, 0.3), (1, 0.6)] and read.test["test/acc1"] == pytest.approx(0.55)
    assert read.selected["val/acc1"] == pytest.approx(0.6) and not read.notes
    every = read_run(run, all_versions=True)  # the old merge, on request
    assert len(every.curves["val/acc1"]) == 5 and every.selected["val/acc1"] == pytest.approx(0.9)
    assert kdl("report", str(run), "--quiet", "--metrics", "val/acc1,test/acc1") == 0
    assert "| 60.00 | 55.00 |" in capsys.readouterr().out
    assert kdl("report", str(run), "--quiet", "--all_versions", "--metrics", "val/acc1") == 0
    assert "| 90.00 |" in capsys.readouterr().out

    resumed = fake_run(tmp_path / "resumed", 0, [0.5, 0.6], 0.0)
    import shutil

    shutil.rmtree(resumed / "lightning_logs" / "version_1")
    _refit(resumed, [0.7, 0.8], 0.75, resume=True)  # version_1 resumes at epoch 2, version_2 tests
    read = read_run(resumed)
    assert [e for e, _ in read.curves["val/acc1"]] == [0, 1, 2, 3] and read.test["test/acc1"] == pytest.approx(0.75)

    untested = fake_run(tmp_path / "untested", 0, [0.5, 0.6], 0.6)
    _refit(untested, [0.7, 0.8])  # a new fit, not tested yet: the old test is not shown as its test
    read = read_run(untested)
    assert read.test == {} and read.curves["val/acc1"] == [(0, 0.7), (1, 0.8)]
    assert kdl("report", str(untested), "--quiet") == 0
    err = capsys.readouterr().err
    assert f"warning: run folder {str(untested)!r}" in err and "version_1 belongs to an older fit" in err


def test_the_evidence_layout_of_a_fit_and_a_test_version_reads_as_before(tmp_path: Path) -> None:
    """``seed<k>/<arm>`` with a fit version, a resume of it and a test version: everything is read."""
    run = fake_run(tmp_path / "seed0" / "aikd", 0, [0.5, 0.6], 0.7)
    (run / "lightning_logs" / "version_1").rename(run / "lightning_logs" / "version_9")
    _refit(run, [0.8], resume=True)  # version_2 resumes version_0
    (run / "lightning_logs" / "version_9").rename(run / "lightning_logs" / "version_3")
    read = read_run(run)
    assert read.curves == read_run(run, all_versions=True).curves and read.test["test/acc1"] == pytest.approx(0.7)
    assert not read.notes
