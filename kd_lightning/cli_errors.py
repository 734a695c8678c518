"""The one-line messages ``kdl`` answers a user's mistake with, instead of a traceback.

:func:`kd_lightning.cli.run_trainer` catches what a Trainer command raises and asks this module for the line
to print: :func:`parse_error_message` for the parser's errors (a typo'd key gets "did you mean", an unknown
KD loss the known ones, a ``nan`` where a number belongs one short line instead of jsonargparse's dump),
:func:`run_error_message` for the rest (the user-fixable error behind jsonargparse's and DataLoader
workers' wrappers, an optimiser's rejected settings). ``None`` means "not the user's fault": the
traceback is shown. :func:`check_config_files` checks the ``--config`` files before the parser reads them.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import traceback

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from kd_lightning.errors import ConfigError, DataCorruptError, DataNotFoundError, KDLError
from kd_lightning.fileio import read_yaml

#: the line after a missing-data error: where datasets come from, and the quick check
DATA_HINT = "where to get each dataset and its layout: docs/datasets.md; check it with `kdl check-data --config RECIPE`"


def known_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` of ``parser`` and of its subcommands' parsers."""
    options = [o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
    for action in getattr(parser, "_actions", []):
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(action.choices, dict) else ():
            options += known_options(sub)
    return options


_NOISE = (
    r"Expected a <class 'NoneType'>|^Given value type|^Given value: [\[{]|NestedArg|^Errors:|^Subtypes:"
    r"|Does not validate against any of the Union"
)


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-fixable error behind ``exc`` (jsonargparse wraps constructor errors), if any."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (KDLError, MisconfigurationException, FileNotFoundError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def _one_line(message: str) -> str:
    """The one line that matters in an error re-raised from a DataLoader worker.

    It comes back as "Caught X in DataLoader worker process N" plus the worker's whole traceback: keep the
    original message (its last line) without the exception's class name.
    """
    if "in DataLoader worker process" not in message or "Original Traceback" not in message:
        return message
    last = [ln.strip() for ln in message.splitlines() if ln.strip()][-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


_NON_FINITE = {"nan", "+nan", "-nan", ".nan", "inf", "+inf", "-inf", ".inf", "-.inf", "infinity", "-infinity"}


def _non_finite_value(argv: list[str], message: str) -> str | None:
    """``--key nan`` (or inf) where the parser expected a number: jsonargparse's union dump, said in one line."""
    for i, tok in enumerate(argv):
        key, _, value = tok.partition("=")
        if not key.startswith("--"):
            continue
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        name = key.rsplit(".", 1)[-1]
        if value.strip().lower() in _NON_FINITE and f'"{name}"' in message:
            return f"{key[2:]}={value}; expected a finite number"
    return None


def _short_parse_error(msg: str) -> str:
    """Keep the lines of a jsonargparse error that name the problem (it reports every union member it tried)."""
    keep = [ln.strip() for ln in msg.splitlines() if ln.strip() and not re.search(_NOISE, ln.strip())]
    return "\n  ".join(keep[:6]) if keep else msg


def check_config_files(argv: list[str]) -> None:
    """Every ``--config``/``-c`` file must exist and hold a YAML mapping of sections; name the file if not."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if os.path.isdir(path):
            raise ConfigError(f"--config {path!r} is a folder; expected a YAML recipe file")
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path!r} does not exist")
        content = read_yaml(path, f"--config {path!r}")
        if content is None:
            raise ConfigError(f"--config {path!r} is empty; expected a mapping of sections (trainer, model, data)")
        if not isinstance(content, dict):
            kind = type(content).__name__
            raise ConfigError(
                f"--config {path!r} holds a {kind}; expected a mapping of sections (trainer, model, data)"
            )


def _suggestion(message: str, options: list[str]) -> str:
    """Suggest "did you mean ...?" for the first unrecognised ``--key`` in a parse error, when one is close."""
    found = re.search(r"[Uu]nrecognized arguments:\s*(--[\w.\-]+)", message)
    if not found or not options:
        return ""
    close = difflib.get_close_matches(found.group(1), options, n=1, cutoff=0.8)
    return f"\ndid you mean {close[0]}?" if close else ""


def _class_hint(message: str) -> str:
    """For an unknown class name in a recipe, the names that would have worked (KD losses, for now)."""
    found = re.search(r"Expected a dot import path string: (\S+)", message)
    if not found:
        return ""
    if "kd_losses" in message:
        from kd_lightning.losses import list_losses

        return f"unknown KD loss {found.group(1)!r}; known losses: {', '.join(list_losses())}"
    return ""


def _optimizer_error(exc: BaseException) -> str | None:
    """The message of a ValueError/TypeError raised while building an optimiser or LR scheduler."""
    if not isinstance(exc, (ValueError, TypeError)):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    if any(f"{os.sep}torch{os.sep}optim{os.sep}" in frame.filename for frame in frames):
        return (
            f"the optimiser or LR scheduler rejected its settings: {exc} "
            "(see model.init_args.optimizer / model.init_args.lr_scheduler in the recipe)"
        )
    return None


def _last_hint() -> str:
    """The end of the line after an interruption (Ctrl-C): what is left, and how to go on."""
    return "the last saved last.ckpt (if any) is intact: resume with --ckpt_path last"


def parse_error_message(exc: BaseException, argv: list[str]) -> str:
    """The message for an error of the command-line/recipe parser on ``argv``."""
    return (
        _class_hint(str(exc))
        or _non_finite_value(argv, str(exc))
        or _short_parse_error(str(exc)) + _suggestion(str(exc), getattr(exc, "kdl_options", []))
    )


def run_error_message(exc: BaseException) -> str | None:
    """The message for an error raised while building or running the command, or None when it is no user error."""
    user_error = _user_error(exc)
    reason = _one_line(str(user_error)) if user_error is not None else _optimizer_error(exc)
    missing_data = isinstance(user_error, DataNotFoundError) and not isinstance(user_error, DataCorruptError)
    if reason is not None and missing_data:
        reason += f"\n{DATA_HINT}"
    return reason
