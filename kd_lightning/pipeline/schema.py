"""What a pipeline file holds (:class:`Stage`, :class:`Ready`) and what a stage becomes once resolved (:class:`Step`).

Checks that need no other stage happen here, in ``__post_init__``; checks across stages (references, run
folders) in :mod:`kd_lightning.pipeline.resolve`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
from dataclasses import dataclass, field
from typing import Any, Union

from kd_lightning.commands import TRAINER_COMMANDS
from kd_lightning.errors import ConfigError, KDLError

__all__ = [
    "BUILTIN_ATTRS",
    "STATE_DIR",
    "TRAINER_COMMANDS",
    "Interrupted",
    "JSONValue",
    "Ready",
    "Stage",
    "StageFailed",
    "Step",
]

#: the sub-folder of a stage's run folder that holds its pipeline record, log and locks
STATE_DIR = "pipeline"
#: attribute names every stage has (or may have); declared outputs may not reuse them
BUILTIN_ATTRS = ("dir", "best", "last", "url")
#: a YAML value as the pipeline file gives it. Not ``Any``: jsonargparse would turn a ``{class_path: ...}`` mapping
#: into a class's namespace (importing it, filling in defaults), where the stage's command expects the mapping
JSONValue = Union[bool, int, float, str, list, dict, None]  # noqa: UP007 - jsonargparse reads this at run time

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def sha(text: str | bytes) -> str:
    """SHA-256 of a string (UTF-8) or bytes, in hex."""
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


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
        args: overrides, ``{key: value}`` (passed as ``--key value``; lists and dicts, ``{class_path: ...}``
            included, as JSON) or a list of raw command-line tokens.
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
    args: dict[str, JSONValue] | list[JSONValue] = field(default_factory=dict)
    dir: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    overwrite: bool = False
    background: bool = False
    ready: Ready | None = None

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
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
            if out in BUILTIN_ATTRS or not NAME.match(out):
                raise ConfigError(
                    f"stage {self.name!r}: output name {out!r} is reserved or malformed (reserved: {BUILTIN_ATTRS})"
                )


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
        return sha(json.dumps(self.spec, sort_keys=True, default=str))

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
