"""Every sweep file is a valid W&B sweep, and every key it sweeps exists in its recipe."""

from __future__ import annotations

import math
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
    assert len(lines) == 16 and lines[0].startswith("[1/16] kdl fit --config recipes/fashion_mnist/blkd.yaml")
