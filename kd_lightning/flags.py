"""One flag convention for every ``kdl`` command: the jsonargparse style of ``kdl fit``.

Options are spelt with underscores (``--dry_run``, ``--per_class``, ``--group_by``), and a boolean option is a
flag that also takes a value: ``--dry_run`` alone means ``--dry_run true``, and ``--dry_run false`` turns it off.
The tool commands (``kdl sweep``, ``report``, ``pipeline``, ``sample``, ``serve-teacher``) run their argv through
:func:`normalize` before their parser sees it, so the older dash spellings (``--dry-run``, ``--group-by``) keep
working as aliases. Plain ``argparse`` parsers declare their booleans with ``type=parse_bool``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from kd_lightning.errors import ConfigError

if TYPE_CHECKING:
    import torch

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(text: str | bool) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0, any case) as a bool; a ValueError naming the text otherwise."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


parse_bool.__name__ = "bool"  # argparse names the type in its message: "invalid bool value: 'x'"


def dash_aliases(names: Iterable[str]) -> dict[str, str]:
    """``{"--dry-run": "--dry_run", ...}`` for every underscored option in ``names``."""
    return {n.replace("_", "-"): n for n in names if "_" in n.lstrip("-")}


def normalize(argv: list[str], bools: Iterable[str] = (), aliases: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` in the canonical spelling: aliases replaced, every boolean flag given an explicit value.

    ``bools``: the canonical names of the boolean options (``--dry_run``); ``aliases``: other spelling ->
    canonical name (default: the dash spelling of every boolean). A bare boolean flag becomes ``--flag=true``;
    ``--flag true``/``--flag false`` (or ``--flag=false``) keep their value. Everything after ``--`` is left as is.
    """
    bools = set(bools)
    aliases = dict(dash_aliases(bools) if aliases is None else aliases)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out += argv[i - 1 :]
            break
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        name = aliases.get(name, name)
        if name not in bools:
            out.append(f"{name}{eq}{value}")
            continue
        if not eq and i < len(argv) and argv[i].strip().lower() in (*_TRUE, *_FALSE):
            value, eq = argv[i], "="
            i += 1
        out.append(f"{name}={value if eq else 'true'}")
    return out


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; a CUDA device on a machine without one is refused."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu (or auto)")
    return device
