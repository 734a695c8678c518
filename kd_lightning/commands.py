"""kdl's entry point and its one dispatch: a table of commands, each named ``"module:function"``.

Every command's module is imported only when that command runs, so the commands that need no Trainer
start without importing torch or Lightning: ``kdl pipeline`` with every stage cached, ``kdl report`` or
``kdl sweep --dry-run`` answer in a fraction of a second. ``fit``/``validate``/``test``/``predict`` go to
:func:`kd_lightning.cli.run_trainer`. Because the table names modules as strings, this module imports
none of them: any layer may read the table (the pipeline checks stage commands against it).
"""

from __future__ import annotations

import sys
from typing import Any

#: kdl's commands that are not Trainer subcommands: name -> ("module:function", one-line help).
#: Each function takes the remaining argv and returns an exit status; modules load only when used.
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("kd_lightning.sample:main", "write GAN samples (N per class or label value) to a file or folder"),
    "generate": ("kd_lightning.sampling.generate:main", "build a cGAN-KD sample store (subsample, filter, relabel)"),
    "oracle": ("kd_lightning.sampling.oracle:main", "build a cGAN-KD oracle store from held-out real images"),
    "pipeline": ("kd_lightning.pipeline:main", "run a recipe's stages in order, skipping those already done"),
    "serve-teacher": ("kd_lightning.serve.server:main", "serve a classifier checkpoint as a black-box teacher"),
    "journal": ("kd_lightning.teachers.journal_tool:main", "check or repair a black-box query journal"),
    "report": ("kd_lightning.report:main", "a table of runs (mean ± std over seeds) and learning curves"),
    "check-data": ("kd_lightning.check_data:main", "check that a recipe's dataset is on disk and loads (split sizes)"),
    "sweep": ("kd_lightning.sweep:main", "check a W&B sweep file and run its command lines here (W&B offline)"),
}


def run_tool_command(name: str, argv: list[str]) -> int:
    """Run one of :data:`TOOL_COMMANDS` on ``argv``."""
    from kd_lightning.checkpoints import pop_trust_args, trust_scope
    from kd_lightning.errors import KDLError

    target, _ = TOOL_COMMANDS[name]
    try:
        argv, trusted = pop_trust_args(argv)  # --trust PATH: the same opt-in for every command
    except KDLError as e:
        print(f"kdl {name}: error: {e}", file=sys.stderr)
        return 2
    func = _load(target)
    with trust_scope(trusted):
        return int(func(argv) or 0)


#: kdl's Trainer subcommands (LightningCLI's): they import torch and Lightning
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

#: where the Trainer subcommands run (takes the whole argv, the subcommand first)
TRAINER_TARGET = "kd_lightning.cli:run_trainer"


def _load(target: str) -> Any:  # noqa: ANN401 - a command's function
    import importlib

    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def usage() -> str:
    """The list of kdl's commands, for ``kdl`` alone and ``kdl --help`` (built without importing Lightning)."""
    lines = ["usage: kdl COMMAND [options]", "", "kdl commands:"]
    lines += [f"  kdl {name:<14} Lightning's {name} on a recipe (--config RECIPE.yaml)" for name in TRAINER_COMMANDS]
    lines += [f"  kdl {name:<14} {helptext}" for name, (_, helptext) in TOOL_COMMANDS.items()]
    lines.append("`kdl COMMAND --help` shows a command's options (e.g. `kdl fit --help`); any command takes")
    lines.append("--trust CKPT (a checkpoint file you trust).")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run ``kdl`` on ``argv``; the command list and tool commands never import Lightning."""
    if argv[:1] and argv[0] in TOOL_COMMANDS:
        return run_tool_command(argv[0], argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return int(_load(TRAINER_TARGET)(argv))


def entrypoint() -> None:
    """The ``kdl`` console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    entrypoint()
