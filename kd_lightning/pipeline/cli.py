"""``kdl pipeline``'s command line: parse the pipeline file and flags, resolve, then plan (``--dry-run``) or run."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import yaml

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.pipeline.resolve import REF, resolve
from kd_lightning.pipeline.run import Runner
from kd_lightning.pipeline.schema import Interrupted, JSONValue, Stage, StageFailed, Step

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


def build_parser() -> ArgumentParser:
    """Build ``kdl pipeline``'s argument parser."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="kdl pipeline",
        description="Run a pipeline's stages in order (each a kdl command), skipping those already done "
        "for the same config and inputs and resuming an interrupted one. See docs/pipeline.md.",
        exit_on_error=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="the pipeline YAML (vars and stages)")
    p.add_argument(
        "--vars",
        type=dict[str, JSONValue],
        default={},
        help="pipeline variables, used as ${name}; one at a time: --vars.NAME VALUE",
    )
    p.add_argument("--stages", type=list[Stage], default=[], help="the stages, in order")
    p.add_argument("--dry_run", type=bool, default=False, help="print the plan (each stage: skip or run, and why)")
    p.add_argument("--only", type=str | None, default=None, metavar="STAGE[,STAGE]", help="run only these stages")
    p.add_argument("--from", dest="from_stage", type=str | None, default=None, metavar="STAGE", help="start here")
    p.add_argument("--force", type=bool, default=False, help="rerun the selected stages even when done")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run up to N stages at once, each as soon as the stages it uses are done (default 1: in file order)",
    )
    return p


def select(steps: list[Step], only: str | None, from_stage: str | None) -> set[str]:
    """Return the names of the stages that ``--only`` and ``--from`` select; raise ConfigError on an unknown name."""
    names = [s.name for s in steps]
    chosen = set(names)
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        bad = [n for n in wanted if n not in names]
        if bad:
            raise ConfigError(f"--only {only}: no stage named {bad[0]!r} (stages: {', '.join(names)})")
        chosen &= set(wanted)
    if from_stage:
        if from_stage not in names:
            raise ConfigError(f"--from {from_stage}: no stage of that name (stages: {', '.join(names)})")
        chosen &= set(names[names.index(from_stage) :])
    return chosen


def load(argv: list[str]) -> tuple[list[Step], Any]:
    """Parse ``kdl pipeline`` arguments and resolve the stages."""
    from jsonargparse import ArgumentError

    from kd_lightning.flags import normalize

    parser = build_parser()
    files = _config_files(argv)
    try:  # kd_lightning.flags: --dry_run (old spelling --dry-run) and --force are flags that also take true/false
        cfg = parser.parse_args(normalize(argv, bools=("--dry_run", "--force")))
        init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    except ArgumentError as e:
        raise ConfigError(str(e).strip()) from None
    except ConfigError as e:
        raise ConfigError(f"{', '.join(files) or 'the pipeline'}: {e}") from None
    try:
        check_command_line_vars(argv, files, cfg)
        return resolve(list(init.stages), dict(init.vars)), init
    except ConfigError as e:
        raise ConfigError(f"{', '.join(files) or 'the pipeline'}: {e}") from None


def _config_files(argv: list[str]) -> list[str]:
    """The pipeline files named by ``--config`` (for messages)."""
    found = []
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif tok.startswith("--config="):
            found.append(tok.split("=", 1)[1])
    return found


def check_command_line_vars(argv: list[str], files: list[str], cfg: Any) -> None:  # noqa: ANN401 - jsonargparse's
    """Refuse ``--vars.NAME`` for a variable that the pipeline neither declares nor uses (a typo would be ignored)."""
    given = [tok[len("--vars.") :].split("=", 1)[0] for tok in argv if tok.startswith("--vars.")]
    if not given:
        return
    declared: set[str] = set()
    for path in files:
        with contextlib.suppress(OSError, yaml.YAMLError):
            with open(path) as f:
                data = yaml.safe_load(f)
            if isinstance(data, dict) and isinstance(data.get("vars"), dict):
                declared |= set(data["vars"])
    text = json.dumps([_plain_tree(cfg.get("stages")), _plain_tree(cfg.get("vars"))], default=str)
    used = {m.group(1).strip().split(".")[0] for m in REF.finditer(text) if m.group(1)}
    for name in given:
        if name not in declared and name not in used:
            known = ", ".join(sorted(declared | used)) or "none"
            raise ConfigError(f"--vars.{name}: the pipeline has no variable {name!r} (variables: {known})")


def _plain_tree(value: Any) -> Any:  # noqa: ANN401 - a parsed config tree
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tree(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """``kdl pipeline``: returns 0, a failed stage's exit status, 2 for a bad pipeline, 130/143 when stopped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    try:
        steps, opts = load(argv)
        if opts.jobs < 1:
            raise ConfigError(f"--jobs {opts.jobs}: expected a number of stages >= 1")
        runner = Runner(steps, select(steps, opts.only, opts.from_stage), force=opts.force, jobs=opts.jobs)
        if opts.dry_run:
            runner.print_plan()
            return 0
        outcome = runner.run()
    except StageFailed as e:
        print(f"kdl pipeline: {e}", file=sys.stderr)
        return e.status or 1
    except Interrupted as e:
        print(f"kdl pipeline: stopped by {e}; run the same command again to continue", file=sys.stderr)
        return 128 + e.signum
    except KDLError as e:
        print(f"kdl pipeline: error: {e}", file=sys.stderr)
        return 2
    runner.print_results()
    ran = sum(v in ("done", "resumed") for v in outcome.values())
    skipped = sum(v == "skipped" for v in outcome.values())
    print(f"kdl pipeline: {ran} stage(s) run, {skipped} skipped, {time.monotonic() - t0:.1f} s")
    return 0
