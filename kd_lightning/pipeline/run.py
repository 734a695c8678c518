"""``kdl pipeline``: run a method's stages in order, skipping those already done, resuming the interrupted one.

    kdl pipeline --config recipes/pipelines/digits_kd.yaml
    kdl pipeline --config recipes/pipelines/digits_kd.yaml --dry-run          # the plan: skip or run, and why
    kdl pipeline --config recipes/pipelines/digits_kd.yaml --from blkd --force  # rerun blkd and what follows
    kdl pipeline --config recipes/pipelines/digits_kd.yaml --vars.epochs 3    # a pipeline variable

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from kd_lightning.errors import ConfigError, KDLError, require_writable_folder
from kd_lightning.pipeline.report import find_plots, results_table, stage_progress, stage_results

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

#: kdl's Trainer subcommands: their run folder is ``trainer.default_root_dir``
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
#: the sub-folder of a stage's run folder that holds its pipeline record and log
STATE_DIR = "pipeline"
#: environment variable: the command that runs ``kdl`` (default: this interpreter, ``-m kd_lightning.cli``)
LAUNCHER_ENV = "KDL_PIPELINE_LAUNCHER"
#: attribute names every stage has (or may have); declared outputs may not reuse them
BUILTIN_ATTRS = ("dir", "best", "last", "url")
#: seconds a stopped stage (Ctrl-C, end of pipeline) gets to exit after SIGTERM before SIGKILL
STOP_GRACE_S = 60.0

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_EXPR = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\.([A-Za-z_][A-Za-z0-9_-]*))?$")


# ---------------------------------------------------------------------------------------------- schema
@dataclass
class Ready:
    """When a background stage counts as started: an HTTP URL answers 200, or a file exists."""

    url: str | None = None
    file: str | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if (self.url is None) == (self.file is None):
            raise ConfigError(f"ready: give exactly one of url or file, got url={self.url!r} file={self.file!r}")
        if self.timeout <= 0:
            raise ConfigError(f"ready.timeout={self.timeout}: expected seconds > 0")


@dataclass
class Stage:
    """One stage of a pipeline: a ``kdl`` command, its recipe(s) and overrides.

    Args:
        name: unique name (letters, digits, ``_``, ``-``); later stages refer to it as ``${name.attr}``.
        command: the kdl subcommand: ``fit``, ``validate``, ``test``, ``predict`` or a tool command
            (``generate``, ``sample``, ``serve-teacher``, ...).
        config: recipe file(s), passed as ``--config`` in order.
        args: overrides, ``{key: value}`` (passed as ``--key value``; lists and dicts as JSON) or a
            list of raw command-line tokens.
        dir: the stage's run folder. Trainer commands default to the recipe's ``trainer.default_root_dir``
            (and get ``--trainer.default_root_dir`` when ``dir`` is given); tool commands must set it.
        outputs: named outputs (files or folders) the stage must write; later stages use ``${name.<output>}``.
        inputs: files, folders or ``${stage.attr}`` references the stage consumes without passing them
            as arguments (they count in the stage's input hashes).
        overwrite: delete the declared ``outputs`` before the stage runs anew because its config or
            inputs changed (or ``--force``), for commands that refuse to write over an output made
            with other settings (``kdl generate``'s store). A rerun of the same config keeps them, so
            such a command still resumes its own work.
        background: start the command, wait for ``ready``, keep it running while the later stages run
            and stop it when the pipeline ends (a teacher server, for instance).
        ready: the readiness check of a background stage.
    """

    name: str
    command: str
    config: str | list[str] | None = None
    args: dict[str, Any] | list[Any] = field(default_factory=dict)
    dir: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    overwrite: bool = False
    background: bool = False
    ready: Ready | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"stage name {self.name!r}: expected letters, digits, '_' or '-' (not first)")
        if not self.command or self.command.startswith("-"):
            raise ConfigError(f"stage {self.name!r}: command {self.command!r} is not a kdl subcommand")
        if self.background and self.ready is None:
            raise ConfigError(f"background stage {self.name!r} needs ready: {{url: ...}} or {{file: ...}}")
        if self.overwrite and (self.background or not self.outputs):
            raise ConfigError(f"stage {self.name!r}: overwrite needs outputs (and no background)")
        if self.ready is not None and not self.background:
            raise ConfigError(f"stage {self.name!r}: ready is only for background stages (background: true)")
        for out in self.outputs:
            if out in BUILTIN_ATTRS or not _NAME.match(out):
                raise ConfigError(
                    f"stage {self.name!r}: output name {out!r} is reserved or malformed (reserved: {BUILTIN_ATTRS})"
                )


# ------------------------------------------------------------------------------------ resolved stages
@dataclass
class Step:
    """A stage with every ``${...}`` resolved: its command line, run folder, artifacts and hash."""

    index: int
    name: str
    command: str
    argv: list[str]  # everything after ``kdl <command>``
    dir: str
    spec: dict[str, Any]  # what the config hash covers
    artifacts: dict[str, str]  # attr -> path (or URL)
    required: list[str]  # outputs that must exist after a successful run
    refs: list[str]  # "stage.attr" consumed
    paths: list[str]  # plain input paths consumed
    overwrite: bool = False
    background: bool = False
    ready: Ready | None = None

    @property
    def config_hash(self) -> str:
        return _sha(json.dumps(self.spec, sort_keys=True, default=str))

    @property
    def state_path(self) -> str:
        return os.path.join(self.dir, STATE_DIR, f"{self.name}.json")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, STATE_DIR, f"{self.name}.log")

    @property
    def progress_path(self) -> str:
        """The one-line progress file the stage's command keeps (kd_lightning.progress), shown while it runs."""
        return os.path.join(self.dir, STATE_DIR, f"{self.name}.progress")

    def shown(self, extra: list[str] | None = None) -> str:
        return shlex.join(["kdl", self.command, *self.argv, *(extra or [])])


def base_url(url: str) -> str:
    """``scheme://host:port`` of ``url``: what ``${stage.url}`` hands on (a client adds its own paths)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else url


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _deep_merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: object) -> None:
    parts = key.lstrip("-").split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _get_dotted(tree: dict[str, Any], key: str) -> Any:  # noqa: ANN401 - a YAML value
    node: Any = tree
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _cli_value(value: object) -> str:
    """A YAML value as one command-line token (jsonargparse reads JSON for lists and dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


class _Resolver:
    """Resolves ``${var}`` and ``${stage.attr}`` in a stage's fields, recording the references it consumes."""

    def __init__(self, variables: dict[str, Any], steps: dict[str, Step], later: tuple[str, ...] = ()) -> None:
        self.variables, self.steps, self.later = variables, steps, later

    def value(self, expr: str, where: str, refs: list[str]) -> Any:  # noqa: ANN401 - a YAML value
        m = _EXPR.match(expr.strip())
        if not m:
            raise ConfigError(f"{where}: ${{{expr}}} is malformed; expected ${{variable}} or ${{stage.attr}}")
        head, attr = m.groups()
        if attr is None:
            if head in self.variables:
                return self.variables[head]
            known = ", ".join(self.variables) or "none"
            hint = f" (did you mean ${{{head}.best}}?)" if head in self.steps else ""
            raise ConfigError(f"{where}: ${{{expr}}} is not a variable (variables: {known}){hint}")
        if head in self.later:
            raise ConfigError(f"{where}: ${{{expr}}} names stage {head!r}, which comes later (or is this stage)")
        if head not in self.steps:
            earlier = ", ".join(self.steps) or "none"
            raise ConfigError(f"{where}: ${{{expr}}} names no earlier stage {head!r} (earlier stages: {earlier})")
        step = self.steps[head]
        if attr not in step.artifacts:
            raise ConfigError(
                f"{where}: ${{{expr}}}: stage {head!r} has no {attr!r} (it has: {', '.join(step.artifacts)})"
            )
        refs.append(f"{head}.{attr}")
        return step.artifacts[attr]

    def __call__(self, obj: Any, where: str, refs: list[str]) -> Any:  # noqa: ANN401 - a YAML tree in and out
        if isinstance(obj, str):
            m = _REF.fullmatch(obj)
            if m and m.group(0) != "$${":  # a whole-string reference keeps its type (numbers, bools)
                return self.value(m.group(1), where, refs)

            def sub(m: re.Match[str]) -> str:
                if m.group(0) == "$${":
                    return "${"
                v = self.value(m.group(1), where, refs)
                if isinstance(v, (dict, list)):
                    raise ConfigError(f"{where}: ${{{m.group(1)}}} is a {type(v).__name__}; it cannot sit inside text")
                return _cli_value(v)

            if "${" in _REF.sub("", obj):
                raise ConfigError(f"{where}: {obj!r} has a '${{' without its closing '}}'; expected ${{name}}")
            return _REF.sub(sub, obj)
        if isinstance(obj, list):
            return [self(v, f"{where}[{i}]", refs) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            return {k: self(v, f"{where}.{k}", refs) for k, v in obj.items()}
        return obj


def _load_yaml(path: str, where: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: recipe {path!r} not found (paths are relative to {os.getcwd()})")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: recipe {path!r} is not a YAML mapping")
    return data


def _as_stage(stage: Stage | dict[str, Any]) -> Stage:
    """Plain dicts (Python callers, tests) get the same validation as parsed YAML."""
    if isinstance(stage, Stage):
        return stage
    ready = stage.get("ready")
    return Stage(**{**stage, "ready": Ready(**ready) if isinstance(ready, dict) else ready})


def resolve(
    stages: list[Stage] | list[dict[str, Any]],
    variables: dict[str, Any],
    tool_commands: tuple[str, ...] | None = None,
) -> list[Step]:
    """Check a pipeline and resolve every stage (reads the recipe files; runs nothing)."""
    if tool_commands is None:
        from kd_lightning.commands import TOOL_COMMANDS

        tool_commands = tuple(n for n in TOOL_COMMANDS if n != "pipeline")
    resolved_vars: dict[str, Any] = {}
    for k, v in variables.items():
        if not _NAME.match(k):
            raise ConfigError(f"variable name {k!r}: expected letters, digits, '_' or '-'")
        resolved_vars[k] = _Resolver(resolved_vars, {})(v, f"vars.{k}", [])
    if not stages:
        raise ConfigError("the pipeline has no stages")
    stages = [_as_stage(s) for s in stages]
    steps: dict[str, Step] = {}
    owners: dict[str, str] = {}  # run folder -> the fit or tool stage that writes it
    for i, stage in enumerate(stages):
        where = f"stage {stage.name!r}"
        if stage.name in steps:
            raise ConfigError(f"{where}: two stages have this name; names must be unique")
        if stage.name in resolved_vars:
            raise ConfigError(f"{where}: a variable has the same name; rename one of them")
        if stage.command not in TRAINER_COMMANDS + tool_commands:
            raise ConfigError(
                f"{where}: command {stage.command!r} is not a kdl command (expected one of "
                f"{', '.join(TRAINER_COMMANDS + tool_commands)})"
            )
        res = _Resolver(resolved_vars, steps, tuple(s.name for s in stages[i:]))
        refs: list[str] = []
        configs = stage.config if isinstance(stage.config, list) else ([stage.config] if stage.config else [])
        configs = [str(res(c, f"{where} config", refs)) for c in configs]
        args = res(stage.args, f"{where} args", refs)
        merged: dict[str, Any] = {}
        for c in configs:
            merged = _deep_merge(merged, _load_yaml(c, where))
        argv: list[str] = [tok for c in configs for tok in ("--config", c)]
        raw: list[str] | None = None
        if isinstance(args, dict):
            for k, v in args.items():
                _set_dotted(merged, k, v)
                argv += [k if k.startswith("-") else f"--{k}", _cli_value(v)]
        else:
            raw = [_cli_value(a) for a in args]
            argv += raw
        run_dir = res(stage.dir, f"{where} dir", refs) if stage.dir is not None else None
        trainer = stage.command in TRAINER_COMMANDS
        if trainer and run_dir is not None:
            argv += ["--trainer.default_root_dir", str(run_dir)]
            _set_dotted(merged, "trainer.default_root_dir", str(run_dir))
        if run_dir is None:
            run_dir = _get_dotted(merged, "trainer.default_root_dir") if trainer else None
            if run_dir is None:
                what = "trainer.default_root_dir in its recipe, or dir:" if trainer else "dir: (its run folder)"
                raise ConfigError(f"{where} (kdl {stage.command}) needs {what}")
        run_dir = os.path.normpath(str(run_dir))
        artifacts: dict[str, str] = {"dir": run_dir}
        required: list[str] = []
        # a fit or a tool command makes its run folder; validate/test/predict may join an earlier stage's folder
        if stage.command not in TRAINER_COMMANDS[1:]:
            if run_dir in owners:
                verb = "fits into" if steps[owners[run_dir]].command == "fit" else "writes"
                raise ConfigError(
                    f"{where}: stage {owners[run_dir]!r} already {verb} {run_dir!r}; give each fit or tool "
                    "stage its own dir"
                )
            owners[run_dir] = stage.name
        if stage.command == "fit":
            ckpt_dir = _get_dotted(merged, "checkpoint.dirpath") or os.path.join(run_dir, "checkpoints")
            best = _get_dotted(merged, "checkpoint.filename") or "best"
            artifacts["best"] = os.path.normpath(os.path.join(str(ckpt_dir), f"{best}.ckpt"))
            artifacts["last"] = os.path.normpath(os.path.join(str(ckpt_dir), "last.ckpt"))
            required.append(artifacts["last"])
        outputs = res(stage.outputs, f"{where} outputs", refs)
        for out, path in outputs.items():
            artifacts[out] = os.path.normpath(str(path))
            required.append(artifacts[out])
            inside = os.path.commonpath([os.path.abspath(run_dir), os.path.abspath(artifacts[out])])
            if stage.overwrite and inside == os.path.abspath(artifacts[out]):
                raise ConfigError(
                    f"{where}: output {out!r} ({artifacts[out]}) holds the run folder {run_dir!r}; with overwrite "
                    "it would be deleted with the stage's record and log"
                )
        ready = None
        if stage.ready is not None:
            ready = Ready(
                url=res(stage.ready.url, f"{where} ready.url", refs) if stage.ready.url else None,
                file=res(stage.ready.file, f"{where} ready.file", refs) if stage.ready.file else None,
                timeout=stage.ready.timeout,
            )
            if ready.url:
                artifacts["url"] = base_url(str(ready.url))
        paths: list[str] = []
        for j, item in enumerate(stage.inputs):
            before = len(refs)
            value = str(res(item, f"{where} inputs[{j}]", refs))
            if len(refs) == before or _REF.fullmatch(item) is None:  # not a pure reference: a path to hash
                paths.append(os.path.normpath(value))
        spec = {
            "command": stage.command,
            "config": merged,
            "argv": raw,
            "dir": run_dir,
            "outputs": {k: artifacts[k] for k in outputs},
            "inputs": paths,
            "background": stage.background,
        }
        steps[stage.name] = Step(
            index=i,
            name=stage.name,
            command=stage.command,
            argv=argv,
            dir=run_dir,
            spec=spec,
            artifacts=artifacts,
            required=required,
            refs=list(dict.fromkeys(refs)),
            paths=paths,
            overwrite=stage.overwrite,
            background=stage.background,
            ready=ready,
        )
    return list(steps.values())


# --------------------------------------------------------------------------------------------- hashing
class Hashes:
    """Content hashes of files and folders, reused while a path's size and mtime are unchanged."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[str, str]] = {}  # abs path -> (signature, sha256)

    def learn(self, record: dict[str, Any]) -> None:
        """Reuse the output hashes a stage recorded (so a cached run reads no checkpoint)."""
        for out in (record.get("outputs") or {}).values():
            if isinstance(out, dict) and {"path", "signature", "sha256"} <= set(out):
                self.known[os.path.abspath(out["path"])] = (out["signature"], out["sha256"])

    @staticmethod
    def _files(path: str) -> list[tuple[str, str]]:
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if root == path and STATE_DIR in dirs:  # the pipeline's own record and log are not content
                dirs.remove(STATE_DIR)
            for f in sorted(files):
                full = os.path.join(root, f)
                found.append((os.path.relpath(full, path), full))
        return found

    def signature(self, path: str) -> str | None:
        if os.path.isfile(path):
            st = os.stat(path)
            return f"file:{st.st_size}:{st.st_mtime_ns}"
        if os.path.isdir(path):
            parts = [f"{rel}:{os.stat(full).st_size}:{os.stat(full).st_mtime_ns}" for rel, full in self._files(path)]
            return "dir:" + _sha("\n".join(parts))
        return None

    def entry(self, path: str) -> dict[str, Any] | None:
        """``{"path", "signature", "sha256"}`` of a file or folder, or None when it does not exist."""
        sig = self.signature(path)
        if sig is None:
            return None
        key = os.path.abspath(path)
        cached = self.known.get(key)
        if cached is not None and cached[0] == sig:
            return {"path": path, "signature": sig, "sha256": cached[1]}
        if sig.startswith("file:"):
            sha = _file_sha(path)
        else:
            sha = _sha("\n".join(f"{rel}\0{_file_sha(full)}" for rel, full in self._files(path)))
        self.known[key] = (sig, sha)
        return {"path": path, "signature": sig, "sha256": sha}

    def sha(self, path: str) -> str | None:
        e = self.entry(path)
        return None if e is None else e["sha256"]


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- the runner
@dataclass
class Decision:
    """What the planner decided for a stage, and why."""

    action: str  # skip | run | resume | blocked | start / idle (background) | off (not selected)
    reason: str
    missing: str | None = None  # blocked: the input that does not exist
    anew: bool = False  # run: a different run than the recorded one (config or inputs changed, or forced)


class StageFailed(KDLError):
    """A stage exited with a non-zero ``status``."""

    def __init__(self, step: Step, status: int, message: str) -> None:
        super().__init__(message)
        self.step, self.status = step, status


class Interrupted(Exception):
    """The pipeline received the signal ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _launcher() -> list[str]:
    custom = os.environ.get(LAUNCHER_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "kd_lightning.cli"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the stage gets SIGTERM if the pipeline dies (even by SIGKILL), so it saves and stops."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"exit status {128 - returncode} (killed by {name})"
    return f"exit status {returncode}"


class Runner:
    """Plans and runs resolved stages: skip / run / resume decisions, logs, records, background processes."""

    def __init__(
        self,
        steps: list[Step],
        selected: set[str] | None = None,
        force: bool = False,
        out: TextIO | None = None,
    ) -> None:
        self.steps = steps
        self.by_name = {s.name: s for s in steps}
        self.selected = set(selected) if selected is not None else {s.name for s in steps}
        self.force = force
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.hashes = Hashes()
        self.records: dict[str, dict[str, Any] | None] = {}
        for s in steps:
            self.records[s.name] = rec = self._read_record(s)
            if rec:
                self.hashes.learn(rec)
        self.background: dict[str, subprocess.Popen] = {}
        self.bg_logs: dict[str, Any] = {}
        self.current: subprocess.Popen | None = None
        self.interrupted: int | None = None

    # ------------------------------------------------------------------ records
    @staticmethod
    def _load_record(path: str) -> dict[str, Any] | None:
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    @classmethod
    def _read_record(cls, step: Step) -> dict[str, Any] | None:
        """The stage's record; else a finished record of the same resolved config in its folder, under another name.

        Two pipelines may name one run differently (seed 1's ``baseline`` is seed 0's ``guide`` in
        recipes/pipelines/aikd_fashion_mnist_overfit.yaml): it is trained once and both skip it.
        """
        rec = cls._load_record(step.state_path)
        if rec is not None:
            return rec
        folder = os.path.dirname(step.state_path)
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(folder)):
                other = cls._load_record(os.path.join(folder, name)) if name.endswith(".json") else None
                if other and other.get("status") == "done" and other.get("config_hash") == step.config_hash:
                    return other
        return None

    def _write_record(self, step: Step, rec: dict[str, Any]) -> None:
        from kd_lightning.fileio import atomic_write_bytes

        atomic_write_bytes(step.state_path, (json.dumps(rec, indent=2, sort_keys=True) + "\n").encode())
        self.records[step.name] = rec

    def fingerprint(self, step: Step) -> str | None:
        """What a ``${stage.dir}`` / ``${stage.url}`` reference consumes: the stage's config, inputs and outputs."""
        if step.background:
            inputs = self.input_hashes(step)
            return None if None in inputs.values() else _sha(json.dumps([step.config_hash, inputs], sort_keys=True))
        rec = self.records.get(step.name)
        return rec.get("fingerprint") if rec and rec.get("status") == "done" else None

    def input_hashes(self, step: Step) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for ref in step.refs:
            name, attr = ref.split(".", 1)
            producer = self.by_name[name]
            found[ref] = (
                self.fingerprint(producer) if attr in ("dir", "url") else self.hashes.sha(producer.artifacts[attr])
            )
        for path in step.paths:
            found[path] = self.hashes.sha(path)
        return found

    # ------------------------------------------------------------------ decisions
    def decide(self, step: Step, rebuilt: set[str] | None = None) -> Decision:
        """Skip, run or resume ``step``, and why. ``rebuilt``: earlier stages that will run first (dry run)."""
        if step.name not in self.selected:
            return Decision("off", "not selected")
        if step.background:
            return Decision("start", "background: starts before the first later stage that runs")
        for ref in step.refs:
            producer = ref.split(".", 1)[0]
            if rebuilt and producer in rebuilt:
                return Decision("run", f"input {ref} is rebuilt by stage {producer!r} first", anew=True)
        inputs = self.input_hashes(step)
        missing = [k for k, v in inputs.items() if v is None]
        if missing:
            k = missing[0]
            if k in step.refs:
                name, attr = k.split(".", 1)
                what = self.by_name[name].artifacts[attr]
                done = (self.records.get(name) or {}).get("status") == "done"
                hint = (
                    f"stage {name!r} is done but left no such file (rerun it: --only {name} --force)"
                    if done
                    else f"run stage {name!r} first"
                )
                return Decision("blocked", f"input {k} ({what}) does not exist; {hint}", k)
            return Decision("blocked", f"input {k} does not exist", k)
        rec = self.records.get(step.name)
        if self.force:
            return Decision("run", "forced (--force)", anew=True)
        if rec is None:
            return Decision("run", "no previous run")
        if rec.get("config_hash") != step.config_hash:
            diff = self._config_diff(rec.get("spec") or {}, step.spec)
            return Decision("run", f"config changed: {diff}", anew=True)
        old_inputs = rec.get("inputs") or {}
        changed = [k for k in inputs if old_inputs.get(k) != inputs[k]] + [k for k in old_inputs if k not in inputs]
        if changed:
            more = f" (+{len(changed) - 1} more)" if changed[1:] else ""
            return Decision("run", f"input {changed[0]} changed{more}", anew=True)
        status = rec.get("status")
        if status != "done":
            last = step.artifacts.get("last")
            started = float(rec.get("run_started") or 0)
            if step.command == "fit" and last and os.path.isfile(last) and os.path.getmtime(last) >= started - 1:
                when = rec.get("finished") or rec.get("started")
                return Decision("resume", f"{status} ({when}); resumes from {last}")
            how = f" ({_describe_status(rec['returncode'])})" if rec.get("returncode") else ""
            made_by = rec.get("made_by")  # the config and inputs of the last run that finished
            other = bool(made_by) and made_by != {"config_hash": step.config_hash, "inputs": inputs}
            made = "; the outputs there were made with another config or inputs" if other else ""
            return Decision("run", f"previous run {status}{how}{made}", anew=other)
        recorded = [o["path"] for o in (rec.get("outputs") or {}).values() if isinstance(o, dict) and "path" in o]
        gone = [p for p in dict.fromkeys(step.required + recorded) if not os.path.exists(p)]
        if gone:
            return Decision("run", f"output {gone[0]} is missing")
        return Decision("skip", f"done {rec.get('finished', '')}, same config and inputs")

    @staticmethod
    def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
        from kd_lightning.callbacks.resume import config_differences

        diffs = config_differences(old, new, ignore=())
        if not diffs:
            return "(record from another version)"
        shown = ", ".join(f"{k.removeprefix('config.')} {a!r} -> {b!r}" for k, a, b in diffs[:3])
        return shown + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")

    def plan(self) -> list[tuple[Step, Decision]]:
        rebuilt: set[str] = set()
        rows = []
        for step in self.steps:
            d = self.decide(step, rebuilt)
            if d.action in ("run", "resume", "blocked"):
                rebuilt.add(step.name)
            elif d.action == "start" and any(ref.split(".", 1)[0] in rebuilt for ref in step.refs):
                rebuilt.add(step.name)  # a server of a checkpoint that is rebuilt first is new to its clients
            rows.append((step, d))
        for i, (step, d) in enumerate(rows):
            if d.action == "start" and not any(later.action in ("run", "resume") for _, later in rows[i + 1 :]):
                rows[i] = (step, Decision("idle", "background: not started, no later stage runs"))
        return rows

    # ------------------------------------------------------------------ display
    def _line(self, step: Step, state: str, detail: str = "", final: bool = True) -> None:
        width, n = max(len(s.name) for s in self.steps), len(self.steps)
        text = f"[{step.index + 1:>{len(str(n))}}/{n}] {step.name:<{width}}  {state:<11} {detail}".rstrip()
        if self.tty:
            self.out.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        self.out.flush()

    def _progress(self, step: Step, since: float, t0: float) -> str:
        """The status line's detail for a running stage: its own progress (epoch/step, samples), then the time."""
        width = shutil.get_terminal_size((100, 20)).columns - len(step.name) - 28
        shown = stage_progress(step.progress_path, step.log_path, since, width=max(20, width))
        return f"{time.monotonic() - t0:.0f} s  {shown or 'log: ' + step.log_path}"

    def print_results(self) -> None:
        """The results of the selected fit and test stages (this run's or a skipped stage's), and the plots."""
        rows, folders = [], []
        for step in self.steps:
            rec = self.records.get(step.name) or {}
            if step.name not in self.selected or rec.get("status") != "done":
                continue
            results = rec.get("results")
            if results is None:  # a record from before results were kept
                results = stage_results(step.command, step.dir)
            rows.append((step.name, step.command, step.dir, results))
            folders.append(step.dir)
        table = results_table(rows)
        if table:
            self.out.write(f"\nResults (fits: best validation metric; tests: the test split):\n{table}\n")
        plots = find_plots(folders)
        if plots:
            self.out.write("Plots:\n" + "".join(f"  {p}\n" for p in plots))
        self.out.flush()

    def print_plan(self) -> None:
        for step, d in self.plan():
            self._line(step, d.action, d.reason + "".join(f"; replaces {p}" for p in self._replaced(step, d)))
            if d.action in ("run", "resume", "start"):
                extra = ["--ckpt_path", "last"] if d.action == "resume" else []
                self.out.write(f"      $ {step.shown(extra)}\n")

    # ------------------------------------------------------------------ processes
    def _popen(self, step: Step, extra: list[str], log: TextIO) -> subprocess.Popen:
        cmd = [*_launcher(), step.command, *step.argv, *extra]
        log.write(f"\n=== kdl pipeline: stage {step.name!r} at {_now()}\n=== {step.shown(extra)}\n")
        log.flush()
        from kd_lightning.progress import PROGRESS_ENV

        with contextlib.suppress(FileNotFoundError):
            os.remove(step.progress_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_ENV: os.path.abspath(step.progress_path)}
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the pipeline only; it stops the stage cleanly
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    @staticmethod
    def _stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the stage's process group (kdl fit saves last.ckpt), SIGKILL after ``grace`` seconds."""
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = self.interrupted is None
        self.interrupted = signum
        proc = self.current
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM if first else signal.SIGKILL)

    def _tail(self, path: str, n: int = 8) -> str:
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()[-n:]
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in lines)

    def start_background(self, step: Step) -> None:
        os.makedirs(os.path.dirname(step.log_path), exist_ok=True)
        log = open(step.log_path, "a")  # noqa: SIM115 - kept open while the process runs
        self.bg_logs[step.name] = log
        t0 = time.monotonic()
        self._line(step, "starting", f"log: {step.log_path}", final=False)
        proc = self._popen(step, [], log)
        self.background[step.name] = proc
        assert step.ready is not None
        target = step.ready.url or step.ready.file
        while True:
            if self.interrupted is not None:
                raise Interrupted(self.interrupted)
            if proc.poll() is not None:
                raise StageFailed(
                    step,
                    _exit_status(proc.returncode),
                    f"background stage {step.name!r} exited with {_describe_status(proc.returncode)} before "
                    f"{target} was ready; log: {step.log_path}",
                )
            if self._is_ready(step.ready):
                break
            if time.monotonic() - t0 > step.ready.timeout:
                self._stop(proc, grace=5)
                raise StageFailed(
                    step,
                    1,
                    f"background stage {step.name!r}: {target} not ready after {step.ready.timeout:g} s; "
                    f"log: {step.log_path}",
                )
            time.sleep(0.1)
        self._line(step, "started", f"background, ready in {time.monotonic() - t0:.1f} s (pid {proc.pid})")

    @staticmethod
    def _is_ready(ready: Ready) -> bool:
        if ready.file is not None:
            return os.path.exists(ready.file)
        try:
            with urllib.request.urlopen(str(ready.url), timeout=2) as r:  # noqa: S310 - the user's own URL
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop_background(self) -> None:
        for name, proc in reversed(list(self.background.items())):
            self._stop(proc, grace=10)
            self.bg_logs[name].close()
            self._line(self.by_name[name], "stopped", f"background ({_describe_status(proc.returncode)})")
        self.background.clear()

    @contextlib.contextmanager
    def _lock(self, step: Step) -> Iterator[None]:
        """One process at a time per stage, and per fit folder: a second one stops with a clear error.

        The fit lock (``<dir>/pipeline/fit.lock``) covers two pipelines whose stages of different names fit into
        one folder (see :meth:`_read_record`).
        """
        require_writable_folder(step.dir, f"stage {step.name!r} dir")
        os.makedirs(os.path.dirname(step.state_path), exist_ok=True)
        with contextlib.ExitStack() as held:
            held.enter_context(
                self._flock(step, step.state_path.removesuffix(".json") + ".lock", f"stage {step.name!r}")
            )
            if step.command == "fit":
                fit_lock = os.path.join(os.path.dirname(step.state_path), "fit.lock")
                held.enter_context(self._flock(step, fit_lock, f"a fit into {step.dir!r} (stage {step.name!r})"))
            yield

    @staticmethod
    @contextlib.contextmanager
    def _flock(step: Step, path: str, what: str) -> Iterator[None]:
        import fcntl

        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                raise StageFailed(step, 2, f"{what} is being run by another process (pid {holder}); {f.name}") from None
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def run_step(self, step: Step, decision: Decision) -> None:
        with self._lock(step):
            self._run_step(step, decision)

    @staticmethod
    def _replaced(step: Step, decision: Decision) -> list[str]:
        """The outputs an ``overwrite`` stage deletes before this run (those that exist)."""
        if not (step.overwrite and decision.action == "run" and decision.anew):
            return []
        return [step.artifacts[k] for k in step.spec["outputs"] if os.path.lexists(step.artifacts[k])]

    def _run_step(self, step: Step, decision: Decision) -> None:
        rec = self.records.get(step.name) or {}
        made_by = rec.get("made_by")
        for path in self._replaced(step, decision):
            self.out.write(f"      removing {path} (overwrite: the stage runs anew)\n")
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            made_by = None
        resume = decision.action == "resume"
        extra = ["--ckpt_path", "last"] if resume else []
        inputs = self.input_hashes(step)
        attempt_start = time.time()
        rec = {
            "stage": step.name,
            "status": "running",
            "command": step.shown(extra),
            "config_hash": step.config_hash,
            "spec": step.spec,
            "inputs": inputs,
            "log": step.log_path,
            "started": _now(),
            "run_started": rec.get("run_started", attempt_start) if resume else attempt_start,
            "attempts": (int(rec.get("attempts", 0)) + 1) if resume else 1,
            "seconds": float(rec.get("seconds", 0.0)) if resume else 0.0,
            "made_by": made_by,
        }
        self._write_record(step, rec)
        t0 = time.monotonic()
        state = "resuming" if resume else "running"
        self._line(step, state, f"log: {step.log_path}", final=not self.tty)
        with open(step.log_path, "a") as log:
            proc = self.current = self._popen(step, extra, log)
            try:
                while True:
                    try:
                        proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        if self.tty:
                            self._line(step, state, self._progress(step, attempt_start, t0), final=False)
            finally:
                if proc.poll() is None:  # an exception in this process (not a signal): stop the stage cleanly
                    self._stop(proc)
                self.current = None
        seconds = time.monotonic() - t0
        rec.update(finished=_now(), seconds=round(rec["seconds"] + seconds, 3), returncode=proc.returncode)
        if self.interrupted is not None:
            rec["status"] = "interrupted"
            self._write_record(step, rec)
            self._line(step, "interrupted", f"{seconds:.1f} s ({_describe_status(proc.returncode)})")
            raise Interrupted(self.interrupted)
        if proc.returncode != 0:
            rec["status"] = "failed"
            self._write_record(step, rec)
            self._line(step, "failed", f"{seconds:.1f} s")
            raise StageFailed(
                step,
                _exit_status(proc.returncode),
                f"stage {step.name!r} failed with {_describe_status(proc.returncode)}; log: {step.log_path}\n"
                + self._tail(step.log_path),
            )
        outputs: dict[str, Any] = {}
        for attr, path in step.artifacts.items():
            if attr in ("dir", "url"):
                continue
            entry = self.hashes.entry(path)
            if entry is not None:
                outputs[attr] = entry
        gone = [p for p in step.required if not os.path.exists(p)]
        if step.command == "fit" and "best" not in outputs and "last" not in outputs:
            gone = gone or [step.artifacts["last"]]
        if gone:
            rec["status"] = "failed"
            self._write_record(step, rec)
            self._line(step, "failed", f"{seconds:.1f} s")
            raise StageFailed(
                step, 1, f"stage {step.name!r} exited 0 but did not write {gone[0]}; log: {step.log_path}"
            )
        rec.update(status="done", outputs=outputs, made_by={"config_hash": step.config_hash, "inputs": inputs})
        rec["results"] = stage_results(step.command, step.dir, since=float(rec["run_started"]) - 1)
        rec["fingerprint"] = _sha(
            json.dumps([step.config_hash, inputs, {k: v["sha256"] for k, v in outputs.items()}], sort_keys=True)
        )
        self._write_record(step, rec)
        self._line(step, "done", f"{seconds:.1f} s" + (f" (resumed; {rec['seconds']:.1f} s in all)" if resume else ""))
        from kd_lightning.sampling.consistency import store_chance_warning  # a store no better than chance

        for path in (step.artifacts[a] for a in outputs if a not in ("best", "last")):
            if warning := store_chance_warning(path):
                print(f"kdl pipeline: stage {step.name!r}: {warning}", file=sys.stderr)

    def run(self) -> dict[str, str]:
        """Run the pipeline; returns each selected stage's outcome (done / skipped / ...)."""
        outcome: dict[str, str] = {}
        pending_bg: list[Step] = []
        handlers = {}
        with contextlib.suppress(ValueError):  # signal handlers only in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            for step in self.steps:
                if self.interrupted is not None:
                    raise Interrupted(self.interrupted)
                if step.background:
                    pending_bg.append(step)
                    continue
                d = self.decide(step)
                if d.action == "off":
                    continue
                if d.action == "skip":
                    self._line(step, "skipped", d.reason)
                    outcome[step.name] = "skipped"
                    continue
                if d.action == "blocked":
                    raise StageFailed(step, 2, f"stage {step.name!r} cannot run: {d.reason}")
                for bg in pending_bg:
                    self.start_background(bg)
                    outcome[bg.name] = "started"
                pending_bg.clear()
                self.run_step(step, d)
                outcome[step.name] = "resumed" if d.action == "resume" else "done"
        finally:
            self.stop_background()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return outcome


# ------------------------------------------------------------------------------------------------ CLI
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
        type=dict[str, Any],
        default={},
        help="pipeline variables, used as ${name}; one at a time: --vars.NAME VALUE",
    )
    p.add_argument("--stages", type=list[Stage], default=[], help="the stages, in order")
    p.add_argument("--dry_run", type=bool, default=False, help="print the plan (each stage: skip or run, and why)")
    p.add_argument("--only", type=str | None, default=None, metavar="STAGE[,STAGE]", help="run only these stages")
    p.add_argument("--from", dest="from_stage", type=str | None, default=None, metavar="STAGE", help="start here")
    p.add_argument("--force", type=bool, default=False, help="rerun the selected stages even when done")
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
    used = {m.group(1).strip().split(".")[0] for m in _REF.finditer(text) if m.group(1)}
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
        runner = Runner(steps, select(steps, opts.only, opts.from_stage), force=opts.force)
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


if __name__ == "__main__":
    sys.exit(main())
