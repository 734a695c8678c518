"""``kdl pipeline``: run a method's stages, skipping those already done, resuming the interrupted one.

    kdl pipeline --config recipes/pipelines/digits_kd.yaml
    kdl pipeline --config recipes/pipelines/digits_kd.yaml --dry-run          # the plan: skip or run, and why
    kdl pipeline --config recipes/pipelines/digits_kd.yaml --from blkd --force  # rerun blkd and what follows
    kdl pipeline --config recipes/pipelines/digits_kd.yaml --vars.epochs 3    # a pipeline variable
    kdl pipeline --config recipes/pipelines/digits_kd.yaml --jobs 2           # independent stages side by side

A pipeline YAML holds ``vars`` (pipeline variables) and ``stages``, an ordered list; each stage is one
``kdl`` command (``fit``, ``test``, ``generate``, ``serve-teacher``, ...) with its recipe(s) and overrides::

    vars: {root: runs/pipelines/digits_kd}
    stages:
      - name: teacher
        command: fit
        config: recipes/digits/teacher.yaml
        dir: ${root}/teacher
      - name: blkd
        command: fit
        config: recipes/digits/blkd.yaml
        dir: ${root}/blkd
        args: {model.init_args.teacher: "${teacher.best}"}

``${name}`` is a variable; ``${stage.dir}``, ``${stage.best}``, ``${stage.last}`` (fit stages),
``${stage.url}`` (background stages: the base of ``ready.url``) and ``${stage.<output>}`` name an earlier
stage's artifacts.
Every stage runs as its own ``kdl`` process, exactly as it would alone, with its output in
``<dir>/pipeline/<name>.log`` and its record (config hash, input and output hashes, status, time) in
``<dir>/pipeline/<name>.json``. A stage is skipped when that record says done for the same resolved
config and the same input hashes and its outputs exist. docs/pipeline.md has the full rules.

The modules follow doit's cut: :mod:`.schema` (what a pipeline file holds), :mod:`.resolve` (interpolation and the
merged recipes), :mod:`.state` (hashes and records), :mod:`.plan` (skip / run / resume, and what waits for what),
:mod:`.process` (processes and locks), :mod:`.run` (running stages, ``--jobs``), :mod:`.report` (status lines and
the results table) and :mod:`.cli`. None imports torch: a cached pipeline answers without starting one.
"""

from __future__ import annotations

from kd_lightning.errors import ConfigError
from kd_lightning.pipeline.cli import build_parser, check_command_line_vars, load, main, select
from kd_lightning.pipeline.plan import Decision, Planner, dependencies
from kd_lightning.pipeline.process import LAUNCHER_ENV, STOP_GRACE_S
from kd_lightning.pipeline.resolve import base_url, cli_value, deep_merge, get_dotted, resolve, set_dotted
from kd_lightning.pipeline.run import Runner
from kd_lightning.pipeline.schema import (
    BUILTIN_ATTRS,
    STATE_DIR,
    TRAINER_COMMANDS,
    Interrupted,
    Ready,
    Stage,
    StageFailed,
    Step,
)
from kd_lightning.pipeline.state import Hashes, file_sha

# the names these had when the pipeline was one module (tests, demo.py and benchmarks use some of them)
_deep_merge, _get_dotted, _set_dotted, _cli_value, _file_sha = deep_merge, get_dotted, set_dotted, cli_value, file_sha

__all__ = [
    "BUILTIN_ATTRS",
    "LAUNCHER_ENV",
    "STATE_DIR",
    "STOP_GRACE_S",
    "TRAINER_COMMANDS",
    "ConfigError",
    "Decision",
    "Hashes",
    "Interrupted",
    "Planner",
    "Ready",
    "Runner",
    "Stage",
    "StageFailed",
    "Step",
    "base_url",
    "build_parser",
    "check_command_line_vars",
    "dependencies",
    "file_sha",
    "load",
    "main",
    "resolve",
    "select",
]
