"""``kdl sweep``: check a W&B sweep file and run its trials on this machine, without a W&B server.

    wandb sweep recipes/sweeps/blkd.yaml && wandb agent ENTITY/PROJECT/SWEEP_ID   # with a W&B account
    kdl sweep recipes/sweeps/blkd_digits.yaml --dry_run       # print every trial's command line and folder
    kdl sweep --config recipes/sweeps/blkd_digits.yaml --trainer.max_epochs 1   # run them here, W&B offline

The file is W&B's sweep format (``method``, ``metric``, ``parameters``, ``command``). It is validated
with W&B's own schema (the ``sweeps`` package, ``pip install 'wandb[sweeps]'``), and its parameter sets
are drawn by W&B's own local controller: the full product for ``grid``, ``--count`` draws for
``random`` (``bayes`` needs the finished runs' metric, so it runs only through ``wandb agent``).
Each set becomes the command line ``wandb agent`` would run: ``${args}`` expands to ``--key=value``, and
any option ``kdl sweep`` does not know itself (``--trainer.max_epochs 1``) is added to every trial's line.

Every trial is a run of its own: a ``kdl fit`` trial writes into ``<root>/sweep-<id>/<trial>``, ``<root>``
being its recipe's ``trainer.default_root_dir`` and ``<trial>`` named by the swept values
(``BLKD-T2-seed0``); its W&B run takes the same name, the sweep as its group, and the swept keys flat in
its config (as ``wandb agent`` puts them). A pipeline trial keeps the folders its pipeline names by the
variables. At the end, the ``kdl report`` of the trials is printed and written to
``<root>/sweep-<id>/report.md``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.fileio import read_yaml
from kd_lightning.wandb_media import RECORD_ENV, SWEEP_ENV  # what a trial's kdl reads (defined beside it)

#: kdl sweep's own options: name -> takes a value (booleans are normalised to --name=VALUE first)
OWN_OPTIONS = {"--config": True, "--count": True, "--dry_run": True, "--offline": True, "--sweep_id": True}
BOOLS = ("--dry_run", "--offline")


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
    config = read_yaml(path, f"sweep file {str(path)!r}")
    if not isinstance(config, dict):
        raise ConfigError(f"sweep file {str(path)!r} holds no mapping; expected W&B's sweep format")
    try:
        violations = _sweeps().schema_violations_from_proposed_config(config)
    except Exception as e:  # noqa: BLE001 - the schema check itself can fail on odd values
        raise ConfigError(f"sweep file {str(path)!r} is not a valid W&B sweep: {e}") from None
    if violations:
        raise ConfigError(f"sweep file {str(path)!r} is not a valid W&B sweep: {'; '.join(violations)}")
    command = config.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise ConfigError(f"sweep file {str(path)!r}: its command must pass ${{args}} (the swept values) to kdl")
    return config


def parameter_sets(config: dict[str, Any], count: int | None = None) -> list[dict[str, Any]]:
    """The parameter sets W&B's controller proposes: every grid point, or ``count`` random draws."""
    if count is not None and count < 1:
        raise ConfigError(f"--count {count}: expected a positive number of trials")
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


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``kdl sweep``'s own arguments, and the rest: overrides for every trial's command line.

    An option is the sweep's own when it is one of :data:`OWN_OPTIONS`; the first plain word is the sweep file.
    Anything else (``--trainer.max_epochs 1``, with the words after it) is passed on; so is everything after
    ``--``.
    """
    own: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.partition("=")[0]
        if arg == "--":
            rest += argv[i + 1 :]
            break
        if name in OWN_OPTIONS or arg in ("-h", "--help"):
            own.append(arg)
            if "=" not in arg and OWN_OPTIONS.get(name) and i + 1 < len(argv):
                own.append(argv[i + 1])
                i += 1
        elif arg.startswith("-"):
            rest.append(arg)
            while "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                rest.append(argv[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, rest


def _value_text(value: Any) -> str:  # noqa: ANN401 - a swept value
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("/", "_").replace(" ", "")


def short_key(key: str) -> str:
    """``model.init_args.kd_losses.init_args.T`` -> ``T``; ``seed_everything`` -> ``seed``; ``vars.rho`` -> ``rho``."""
    if key == "seed_everything":
        return "seed"
    return key.rsplit(".", 1)[-1]


def method_label(line: list[str]) -> str:
    """What a trial trains, read from the recipes its command line names: the KD losses, else the model class."""
    if len(line) > 1 and line[1] == "pipeline":
        configs = [line[i + 1] for i, a in enumerate(line[:-1]) if a == "--config"]
        return Path(configs[0]).stem if configs else "pipeline"
    from kd_lightning.report import method_name

    model: dict[str, Any] = {}
    for path in _config_files(line):
        section = _yaml(path).get("model")
        if isinstance(section, dict):
            model = section
    name = method_name(model) if model else "run"
    if "[" in name:
        return name.split("[", 1)[1].rstrip("]")
    return name


def trial_name(line: list[str], values: dict[str, Any]) -> str:
    """A trial's name from its method and swept values: ``BLKD-T2-weight0.5-seed0``."""
    parts = [method_label(line)] + [f"{short_key(k)}{_value_text(v)}" for k, v in values.items()]
    return "-".join(parts)


def _config_files(line: list[str]) -> list[str]:
    return [arg.split("=", 1)[1] if "=" in arg else line[i + 1] for i, arg in enumerate(line)
            if (arg == "--config" and i + 1 < len(line)) or arg.startswith("--config=")]  # fmt: skip


def _yaml(path: str) -> dict[str, Any]:
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}  # the trial's own kdl names the problem when it runs
    return content if isinstance(content, dict) else {}


def root_dir(line: list[str], sweep_name: str) -> str:
    """Where a ``kdl fit`` trial's recipe puts its run: the last ``trainer.default_root_dir`` given."""
    root = f"runs/sweeps/{sweep_name}"
    for path in _config_files(line):
        trainer = _yaml(path).get("trainer")
        if isinstance(trainer, dict) and trainer.get("default_root_dir"):
            root = str(trainer["default_root_dir"])
    for i, arg in enumerate(line):
        if arg.startswith("--trainer.default_root_dir="):
            root = arg.split("=", 1)[1]
        elif arg == "--trainer.default_root_dir" and i + 1 < len(line):
            root = line[i + 1]
    return root


def _executable(line: list[str]) -> list[str]:
    """The argv to run: ``kdl`` is this installation's (the interpreter running kdl sweep), others from PATH."""
    if line[0] == "kdl":
        return [sys.executable, "-m", "kd_lightning.commands", *line[1:]]
    if shutil.which(line[0]) is None:
        raise ConfigError(f"the sweep's command {line[0]!r} is not a program found on PATH; expected kdl")
    return line


def build_parser() -> ArgumentParser:
    """Build ``kdl sweep``'s argument parser (its own options; the rest goes to every trial)."""
    p = ArgumentParser(
        prog="kdl sweep",
        description=__doc__.split("\n\n")[0],
        epilog="Any other option (e.g. --trainer.max_epochs 1) is added to every trial's command line.",
        exit_on_error=False,
    )
    p.add_argument("file", type=str | None, nargs="?", default=None,
                   help="a sweep file in W&B's format (recipes/sweeps/*.yaml); or --config FILE")  # fmt: skip
    p.add_argument("--config", type=str | None, default=None, help="the sweep file (instead of the positional one)")
    p.add_argument("--count", type=int | None, default=None, help="run at most this many parameter sets (> 0)")
    p.add_argument("--dry_run", type=bool, default=False,
                   help="print each trial's command line, run nothing (a flag; also takes true/false)")  # fmt: skip
    p.add_argument("--offline", type=bool, default=True, help="set WANDB_MODE=offline for the trials")
    p.add_argument("--sweep_id", type=str | None, default=None,
                   help="names the sweep's folder sweep-<id> and W&B group (default: the start time)")  # fmt: skip
    return p


def _sweep_file(args: Any) -> str:  # noqa: ANN401 - a jsonargparse namespace
    if args.file and args.config and args.file != args.config:
        raise ConfigError(f"two sweep files given ({args.file!r} and --config {args.config!r}); give one")
    file = args.config or args.file
    if not file:
        raise ConfigError("no sweep file: kdl sweep FILE or kdl sweep --config FILE")
    return str(file)


def _check_overrides(overrides: list[str], values: dict[str, Any]) -> None:
    swept = {f"--{k}" for k in values}
    for arg in overrides:
        if arg.partition("=")[0] in swept:
            raise ConfigError(f"{arg.partition('=')[0]} is swept by the sweep file; it cannot also be overridden")


def _report(folders: list[str], config: dict[str, Any], out: Path | None) -> None:
    """Print (and write to ``out``) the ``kdl report`` table of the trials' folders, one row per trial."""
    from kd_lightning.report import read_runs, table, write_report

    present = list(dict.fromkeys(os.path.relpath(os.path.abspath(f)) for f in folders if Path(f).is_dir()))
    if not present:
        return
    try:
        runs, _ = read_runs(present)
    except KDLError as e:
        print(f"kdl sweep: no results table: {e}", file=sys.stderr)
        return
    text = table(runs, "run")
    metric = (config.get("metric") or {}).get("name")
    if metric:
        pick = min if (config.get("metric") or {}).get("goal") == "minimize" else max
        scored = [(r.selected[metric], r) for r in runs if r.selected.get(metric) is not None]
        if scored:
            value, best = pick(scored, key=lambda vr: vr[0])
            text += f"\n\nbest trial on {metric}: {best.path} ({value:.4g})"
    if out is not None:
        text = write_report(runs, "run", text, str(out))
    print(f"\nkdl sweep: results of {len(runs)} trial(s)" + (f" (written to {out})" if out else ""))
    print(text)


def main(argv: list[str] | None = None) -> int:
    """Run ``kdl sweep``; return the exit status."""
    from kd_lightning.flags import normalize

    argv = normalize(list(sys.argv[1:] if argv is None else argv), bools=BOOLS)
    own, overrides = split_argv(argv)
    try:
        args = build_parser().parse_args(own)
    except Exception as e:  # noqa: BLE001 - jsonargparse reports usage errors as exceptions here
        print(f"kdl sweep: error: {e}", file=sys.stderr)
        return 2
    try:
        file = _sweep_file(args)
        config = load_sweep(file)
        sets = parameter_sets(config, args.count)
        for values in sets:
            _check_overrides(overrides, values)
    except KDLError as e:
        print(f"kdl sweep: error: {e}", file=sys.stderr)
        return 2
    sweep_id = args.sweep_id or time.strftime("%Y%m%d-%H%M%S")
    name = str(config.get("name") or Path(file).stem)
    group = f"{name}-sweep-{sweep_id}"
    env = {**os.environ, **({"WANDB_MODE": "offline"} if args.offline else {})}
    record = Path(tempfile.mkstemp(prefix="kdl-sweep-", suffix=".txt")[1])
    env[RECORD_ENV] = str(record)
    folders: list[str] = []
    roots: list[str] = []
    try:
        for i, values in enumerate(sets):
            line = command_line(config, values)
            trial = trial_name(line, values)
            if len(line) > 1 and line[1] == "fit":
                root = Path(root_dir(line + overrides, name)) / f"sweep-{sweep_id}"
                folder = root / trial
                n = 2
                while str(folder) in folders:  # a random sweep may draw the same values twice
                    folder, n = root / f"{trial}-{n}", n + 1
                folders.append(str(folder))
                roots.append(str(root))
                line = [*line, *overrides, f"--trainer.default_root_dir={folder}"]
            else:
                line = [*line, *overrides]
            print(f"[{i + 1}/{len(sets)}] {trial}: {shlex.join(line)}", flush=True)
            if args.dry_run:
                continue
            trial_env = {**env, SWEEP_ENV: json.dumps(
                {"id": sweep_id, "name": name, "group": group, "trial": trial, "values": values})}  # fmt: skip
            try:
                status = subprocess.call(_executable(line), env=trial_env)
            except OSError as e:
                raise ConfigError(f"the sweep's command {line[0]!r} cannot run: {e.strerror or e}") from None
            if status != 0:
                print(f"kdl sweep: trial {i + 1} ({trial}) exited with status {status}; stopping", file=sys.stderr)
                return status
        if not args.dry_run:
            recorded = [ln for ln in record.read_text().splitlines() if ln]
            out = Path(roots[0]) / "report.md" if roots and len(set(roots)) == 1 else None
            _report([*folders, *recorded], config, out)
    except KDLError as e:
        print(f"kdl sweep: error: {e}", file=sys.stderr)
        return 2
    finally:
        record.unlink(missing_ok=True)
    return 0
