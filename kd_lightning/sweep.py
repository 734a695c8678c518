"""``kdl sweep``: check a W&B sweep file and run its command lines on this machine, without a W&B server.

    wandb sweep recipes/sweeps/blkd.yaml && wandb agent ENTITY/PROJECT/SWEEP_ID   # with a W&B account
    kdl sweep recipes/sweeps/blkd.yaml --dry-run        # print every command line of the grid
    kdl sweep recipes/sweeps/blkd.yaml --count 4        # run 4 of them here, logging to W&B offline

The file is W&B's sweep format (``method``, ``metric``, ``parameters``, ``command``). It is validated
with W&B's own schema (the ``sweeps`` package, ``pip install 'wandb[sweeps]'``), and its parameter sets
are drawn by W&B's own local controller: the full product for ``grid``, ``--count`` draws for
``random`` (``bayes`` needs the finished runs' metric, so it runs only through ``wandb agent``).
Each set becomes the command line ``wandb agent`` would run: ``${args}`` expands to ``--key=value``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from kd_lightning.errors import ConfigError, KDLError


def _sweeps() -> ModuleType:
    try:
        with warnings.catch_warnings():  # the package predates pydantic 2's renamed config keys
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError:
        raise ConfigError("kdl sweep needs W&B's sweep engine: pip install 'wandb[sweeps]'") from None
    return sweeps


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep file, validated against W&B's schema; the violations are named when it is not valid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ConfigError(f"sweep file {str(path)!r} holds no mapping; expected W&B's sweep format")
    violations = _sweeps().schema_violations_from_proposed_config(config)
    if violations:
        raise ConfigError(f"sweep file {str(path)!r} is not a valid W&B sweep: {'; '.join(violations)}")
    if "${args}" not in (config.get("command") or []):
        raise ConfigError(f"sweep file {str(path)!r}: its command must pass ${{args}} (the swept values) to kdl")
    return config


def parameter_sets(config: dict[str, Any], count: int | None = None) -> list[dict[str, Any]]:
    """The parameter sets W&B's controller proposes: every grid point, or ``count`` random draws."""
    sweeps = _sweeps()
    method = config.get("method")
    if method == "bayes":
        raise ConfigError("a bayes sweep chooses each run from the previous runs' metric: run it with wandb agent")
    if method == "random" and not count:
        raise ConfigError("a random sweep has no end: give --count N")
    runs: list[Any] = []
    out: list[dict[str, Any]] = []
    while count is None or len(out) < count:
        proposal = sweeps.next_run(config, runs)
        if proposal is None:  # the grid is exhausted
            break
        values = {k: v["value"] for k, v in proposal.config.items()}
        out.append(values)
        runs.append(sweeps.SweepRun(name=f"local-{len(out)}", state=sweeps.RunState.finished, config=proposal.config))
    return out


def command_line(config: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` would run for ``values`` (``${env}`` dropped, ``${args}`` expanded)."""
    line: list[str] = []
    for part in config["command"]:
        if part == "${env}":
            continue
        if part == "${args}":
            line += [f"--{k}={v}" for k, v in values.items()]
        elif part == "${interpreter}":
            line.append(sys.executable)
        elif part == "${program}":
            line.append(str(config.get("program", "")))
        else:
            line.append(str(part))
    return line


def build_parser() -> ArgumentParser:
    """Build ``kdl sweep``'s argument parser."""
    p = ArgumentParser(prog="kdl sweep", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("file", type=str, help="a sweep file in W&B's format (recipes/sweeps/*.yaml)")
    p.add_argument("--count", type=int, default=None, help="run at most this many parameter sets")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", type=bool, default=False,
                   help="print the command lines, run nothing")  # fmt: skip
    p.add_argument("--offline", type=bool, default=True, help="set WANDB_MODE=offline for the runs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``kdl sweep``; return the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except Exception as e:  # noqa: BLE001
        print(f"kdl sweep: error: {e}", file=sys.stderr)
        return 2
    try:
        config = load_sweep(args.file)
        sets = parameter_sets(config, args.count)
    except KDLError as e:
        print(f"kdl sweep: error: {e}", file=sys.stderr)
        return 2
    env = {**os.environ, **({"WANDB_MODE": "offline"} if args.offline else {})}
    for i, values in enumerate(sets):
        line = command_line(config, values)
        print(f"[{i + 1}/{len(sets)}] {shlex.join(line)}", flush=True)
        if args.dry_run:
            continue
        status = subprocess.call(line, env=env)
        if status != 0:
            print(f"kdl sweep: run {i + 1} exited with status {status}; stopping", file=sys.stderr)
            return status
    return 0
