"""From a pipeline file's stages to resolved :class:`~kd_lightning.pipeline.schema.Step` objects.

``${...}`` interpolation, the recipes' YAML merged with the overrides (what a stage's config hash covers), run
folders and artifacts. Reads recipe files; runs nothing.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import yaml

from kd_lightning.errors import ConfigError
from kd_lightning.pipeline.schema import NAME, TRAINER_COMMANDS, Ready, Stage, Step

#: ``${...}`` (group 1: what is inside) or the escape ``$${``
REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_EXPR = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\.([A-Za-z_][A-Za-z0-9_-]*))?$")


def base_url(url: str) -> str:
    """``scheme://host:port`` of ``url``: what ``${stage.url}`` hands on (a client adds its own paths)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else url


def deep_merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``base``, mappings merged key by key (as jsonargparse merges ``--config`` files)."""
    out = dict(base)
    for k, v in new.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(tree: dict[str, Any], key: str, value: object) -> None:
    """``tree[a][b][c] = value`` for ``key`` ``a.b.c`` (or ``--a.b.c``), making the mappings on the way."""
    parts = key.lstrip("-").split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def get_dotted(tree: dict[str, Any], key: str) -> Any:  # noqa: ANN401 - a YAML value
    """``tree[a][b][c]`` for ``key`` ``a.b.c``, or None."""
    node: Any = tree
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def cli_value(value: object) -> str:
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
            m = REF.fullmatch(obj)
            if m and m.group(0) != "$${":  # a whole-string reference keeps its type (numbers, bools)
                return self.value(m.group(1), where, refs)

            def sub(m: re.Match[str]) -> str:
                if m.group(0) == "$${":
                    return "${"
                v = self.value(m.group(1), where, refs)
                if isinstance(v, (dict, list)):
                    raise ConfigError(f"{where}: ${{{m.group(1)}}} is a {type(v).__name__}; it cannot sit inside text")
                return cli_value(v)

            if "${" in REF.sub("", obj):
                raise ConfigError(f"{where}: {obj!r} has a '${{' without its closing '}}'; expected ${{name}}")
            return REF.sub(sub, obj)
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
        if not NAME.match(k):
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
        steps[stage.name] = _resolve_stage(i, stage, res, where, owners, steps)
    return list(steps.values())


def _resolve_stage(
    i: int, stage: Stage, res: _Resolver, where: str, owners: dict[str, str], steps: dict[str, Step]
) -> Step:
    refs: list[str] = []
    configs = stage.config if isinstance(stage.config, list) else ([stage.config] if stage.config else [])
    configs = [str(res(c, f"{where} config", refs)) for c in configs]
    args = res(stage.args, f"{where} args", refs)
    merged: dict[str, Any] = {}
    for c in configs:
        merged = deep_merge(merged, _load_yaml(c, where))
    argv: list[str] = [tok for c in configs for tok in ("--config", c)]
    raw: list[str] | None = None
    if isinstance(args, dict):
        for k, v in args.items():
            set_dotted(merged, k, v)
            argv += [k if k.startswith("-") else f"--{k}", cli_value(v)]
    else:
        raw = [cli_value(a) for a in args]
        argv += raw
    run_dir = res(stage.dir, f"{where} dir", refs) if stage.dir is not None else None
    trainer = stage.command in TRAINER_COMMANDS
    if trainer and run_dir is not None:
        argv += ["--trainer.default_root_dir", str(run_dir)]
        set_dotted(merged, "trainer.default_root_dir", str(run_dir))
    if run_dir is None:
        run_dir = get_dotted(merged, "trainer.default_root_dir") if trainer else None
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
        ckpt_dir = get_dotted(merged, "checkpoint.dirpath") or os.path.join(run_dir, "checkpoints")
        best = get_dotted(merged, "checkpoint.filename") or "best"
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
        if len(refs) == before or REF.fullmatch(item) is None:  # not a pure reference: a path to hash
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
    return Step(
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
