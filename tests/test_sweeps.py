"""Every sweep file is a valid W&B sweep, and every key it sweeps exists in its recipe."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd_lightning import pipeline
from kd_lightning.errors import ConfigError
from kd_lightning.sweep import command_line, load_sweep, parameter_sets
from tests.helpers import RECIPES, REPO

SWEEPS = sorted((RECIPES / "sweeps").glob("*.yaml"))


def lookup(config: dict[str, Any], dotted: str) -> Any:
    """A value of the printed config by its command-line key (the last list element for ``kd_losses.x``)."""
    value: Any = config
    for part in dotted.split("."):
        if isinstance(value, list):
            value = value[-1]
        value = value[part]
    return value


def test_there_are_sweeps() -> None:
    assert {p.stem for p in SWEEPS} >= {"aikd", "blkd", "cgankd", "mekd"}


def print_config(kdl, capsys, command: str, argv: list[str]) -> dict[str, Any]:
    """``kdl COMMAND ... --print_config`` through the real parser; the printed config."""
    capsys.readouterr()
    assert kdl(command, *argv, "--print_config") == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def without_ckpt_path(argv: list[str]) -> list[str]:
    """A stage's command line without ``--ckpt_path`` (kdl test reads that file while parsing)."""
    if "--ckpt_path" not in argv:
        return list(argv)
    i = argv.index("--ckpt_path")
    return argv[:i] + argv[i + 2 :]


def choices(spec: dict[str, Any]) -> list[Any]:
    return spec["values"] if "values" in spec else [spec["min"], spec["max"]]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_valid_and_every_swept_key_exists(path: Path, kdl, capsys, monkeypatch) -> None:
    """W&B's schema accepts the file; one drawn parameter set becomes the command line wandb agent runs, and that
    line goes through the real command's parser: ``kdl fit --print_config`` (every swept key is a recipe key with
    that value), or ``kdl pipeline --dry-run`` plus ``--print_config`` of every stage it resolves to (every swept
    pipeline variable reaches a stage: another value changes a stage's command line)."""
    monkeypatch.chdir(REPO)  # sweep commands name recipes relative to the repository, as wandb agent runs them
    config = load_sweep(path)
    values = parameter_sets(config, count=1)[0]
    assert set(values) == set(config["parameters"])
    line = command_line(config, values)
    assert line[0] == "kdl" and all(f"--{k}={v}" in line for k, v in values.items())
    if line[1] == "fit":
        printed = print_config(kdl, capsys, "fit", line[2:])
        for key, value in values.items():
            assert lookup(printed, key) == pytest.approx(value), key
        return
    assert line[1] == "pipeline", f"{path.name}: a sweep runs kdl fit or kdl pipeline, not {line[1]!r}"
    assert all(k.startswith("vars.") for k in values), "a pipeline sweep sets pipeline variables"
    capsys.readouterr()
    assert kdl(*line[1:], "--dry-run") == 0, capsys.readouterr().err
    plan = capsys.readouterr().out
    steps, _ = pipeline.load(line[2:])
    assert plan.count("$ kdl ") == len(steps)
    for step in steps:
        print_config(kdl, capsys, step.command, without_ckpt_path(step.argv))
    for key, value in values.items():
        other = next(v for v in choices(config["parameters"][key]) if v != value)
        changed, _ = pipeline.load([*line[2:], f"--{key}={other}"])
        assert [s.argv for s in changed] != [s.argv for s in steps], f"{key} reaches no stage"
        assert any(str(value) in s.argv for s in steps), f"{key}={value} is no stage's argument"


def test_grid_is_the_full_product(tmp_path: Path) -> None:
    config = load_sweep(RECIPES / "sweeps" / "blkd.yaml")
    sets = parameter_sets(config)
    assert len(sets) == math.prod(len(p["values"]) for p in config["parameters"].values())
    assert len({tuple(sorted(s.items())) for s in sets}) == len(sets)


def test_invalid_sweeps_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "gridd", "parameters": {"x": {"values": [1]}}, "command": ["${args}"]}))
    with pytest.raises(ConfigError, match="'gridd' is not one of"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": {"x": {"values": [1]}}, "command": ["kdl"]}))
    with pytest.raises(ConfigError, match=r"must pass \$\{args\}"):
        load_sweep(bad)
    random = {"method": "random", "parameters": {"x": {"values": [1, 2]}}, "command": ["kdl", "${args}"]}
    with pytest.raises(ConfigError, match="give --count"):
        parameter_sets(random)


def test_dry_run_prints_every_command(kdl, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    assert kdl("sweep", "recipes/sweeps/blkd.yaml", "--dry-run", "true") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 16 and lines[0].startswith(
        "[1/16] BLKD-T1-weight0.5-task_weight0.1-seed0: kdl fit --config recipes/fashion_mnist/blkd.yaml"
    )


def tiny_sweep(tmp_path: Path, values: list[int]) -> Path:
    """A grid over BLKD's T on digits, naming the repository's recipes by absolute path."""
    sweep = {
        "name": "tiny",
        "method": "grid",
        "metric": {"name": "val/acc1", "goal": "maximize"},
        "parameters": {"model.init_args.kd_losses.init_args.T": {"values": values}, "seed_everything": {"values": [0]}},
        "command": [
            "${env}",
            "kdl",
            "fit",
            "--config",
            str(RECIPES / "digits/blkd.yaml"),
            "--config",
            str(RECIPES / "fragments/wandb.yaml"),
            "${args}",
        ],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.filterwarnings("ignore")
def test_every_trial_keeps_its_own_folder_name_and_wandb_run(kdl, tmp_path: Path, monkeypatch, capsys) -> None:
    """Two trials: two run folders with their own checkpoints, two W&B runs named by their values in the sweep's
    group, the swept keys flat in each run's config, W&B's summary of val/acc1 its best epoch, the overrides applied
    to every trial, and a results table (the kdl report of the trials) at the end."""
    from kd_lightning.report import read_run
    from kd_lightning.wandb_offline import read_offline_run
    from tests.helpers import QUIET, write_teacher

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    teacher = write_teacher(tmp_path / "teacher.ckpt", 10, 1, 8, (0.3,), (0.38,))
    overrides = ["--model.init_args.net", "tinynet", "--model.init_args.teacher", str(teacher),
                 "--data.init_args.train_size", "100", "--trainer.max_epochs", "2", *QUIET]  # fmt: skip
    assert kdl("sweep", "--config", str(tiny_sweep(tmp_path, [2, 4])), "--sweep_id", "t1", *overrides) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "runs/digits/blkd/sweep-t1"
    trials = {"BLKD-T2-seed0": 2.0, "BLKD-T4-seed0": 4.0}
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(trials)
    for name, T in trials.items():
        folder = sweep / name
        assert (folder / "checkpoints/best.ckpt").is_file() and (folder / "checkpoints/last.ckpt").is_file()
        run = read_run(folder)  # the CSV logger beside W&B: kdl report reads the trial like any run
        assert run.config["model"]["init_args"]["kd_losses"][0]["init_args"]["T"] == T
        assert len(run.curves["val/acc1"]) == 2  # --trainer.max_epochs 2 reached every trial
        wb = read_offline_run(folder)
        assert wb.name == name and wb.group == "tiny-sweep-t1"
        assert wb.config["model.init_args.kd_losses.init_args.T"] == T  # flat, as wandb agent puts it
        assert wb.config["sweep"] == {"id": "t1", "name": "tiny", "trial": name}
        assert wb.summary["val/acc1"]["max"] == pytest.approx(max(wb.scalars("val/acc1")))
        assert f"| {folder.relative_to(tmp_path)} | 1 | 0 |" in out
    assert "kdl sweep: results of 2 trial(s)" in out and "best trial on val/acc1" in out
    assert (sweep / "report.md").read_text().startswith("| group")


def test_sweep_flags_follow_kdl_fit(kdl, capsys, monkeypatch, tmp_path: Path) -> None:
    """--dry_run as a bare flag or with true/false, the old --dry-run spelling, and --config FILE."""
    monkeypatch.chdir(REPO)
    for flags in (["--dry-run"], ["--dry_run"], ["--dry_run", "true"], ["--dry-run", "true"]):
        assert kdl("sweep", "recipes/sweeps/blkd_digits.yaml", *flags) == 0, flags
        assert capsys.readouterr().out.count("\n") == 4
    assert kdl("sweep", "--config", "recipes/sweeps/blkd_digits.yaml", "--dry_run", "--sweep_id", "s") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("[2/4] BLKD-T2-seed0: kdl fit --config recipes/digits/blkd.yaml")
    assert lines[1].endswith("--trainer.default_root_dir=runs/digits/blkd/sweep-s/BLKD-T2-seed0")
    assert kdl("sweep", "--config", "recipes/sweeps/blkd_digits.yaml", "--dry_run", "--trainer.max_epochs", "1") == 0
    assert all(
        "--trainer.max_epochs 1 --trainer.default_root_dir=" in ln for ln in capsys.readouterr().out.splitlines()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "-3"], "--count -3: expected a positive number"),
        (["--count", "0"], "--count 0: expected a positive number"),
        (["--model.init_args.kd_losses.init_args.T", "3"], "is swept by the sweep file"),
        ([], "no sweep file"),
    ],
)
def test_bad_sweep_arguments_are_one_line(kdl, capsys, monkeypatch, args: list[str], message: str) -> None:
    monkeypatch.chdir(REPO)
    file = [] if message == "no sweep file" else ["recipes/sweeps/blkd_digits.yaml"]
    assert kdl("sweep", *file, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_a_malformed_sweep_file_or_a_missing_program_is_one_line(kdl, capsys, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("method: grid\nparameters: {x: {values: [1, 2]\n")
    assert kdl("sweep", str(tmp_path / "bad.yaml")) == 2
    err = capsys.readouterr().err.strip()
    assert "'" + str(tmp_path / "bad.yaml") + "' is not valid YAML at line" in err and "Traceback" not in err
    missing = {"method": "grid", "parameters": {"x": {"values": [1]}}, "command": ["no-such-kdl-program", "${args}"]}
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing))
    assert kdl("sweep", str(tmp_path / "missing.yaml")) == 2
    err = capsys.readouterr().err.strip()
    assert "'no-such-kdl-program' is not a program found on PATH" in err and err.count("\n") == 0
