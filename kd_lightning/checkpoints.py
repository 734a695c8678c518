"""Reading checkpoints and weight files safely, with clear errors.

Every file is read with ``torch.load(weights_only=True)``: tensors, containers and plain values only,
so a checkpoint from someone else cannot run code when it is opened (a pickle can name any callable).
kdl's own checkpoints hold nothing else. A file that needs more (an old or foreign checkpoint that
pickled objects) is refused with a message. Trust names the file it applies to, never the process:

- ``--trust PATH`` (any ``kdl`` command, repeatable) allows full unpickling of that one file;
- ``--weights_only false`` (Lightning's own flag, ``kdl fit|validate|test|predict``; and ``kdl sample``)
  trusts the command's ``--ckpt_path`` (``--ckpt``) file only;
- :data:`TRUST_ENV` holds paths (separated by ``os.pathsep``), for scripts that cannot pass flags.

Every other file of the same command (a teacher, ``S_sup``, ``net_weights``) stays weights-only.
"""

from __future__ import annotations

import os
import pickle
import shlex
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_lightning.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

#: the paths (separated by ``os.pathsep``) of files to read with full unpickling (only files you trust)
TRUST_ENV = "KDL_TRUST_CHECKPOINTS"
#: values of :data:`TRUST_ENV` that once trusted every file; they now trust none (the message says why)
_OLD_FLAG_VALUES = ("1", "true", "True", "TRUE", "yes", "on")

_trusted: set[str] = set()  # real paths trusted by this command (:func:`trust_scope`)


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _env_entries() -> list[str]:
    return [e for e in os.environ.get(TRUST_ENV, "").split(os.pathsep) if e and e not in ("0", "false", "False")]


def trust(path: str | os.PathLike) -> None:
    """Allow full unpickling of the file at ``path`` (the one the user named) until the current scope ends."""
    _trusted.add(_key(path))


def is_trusted(path: str | os.PathLike) -> bool:
    """Whether the user trusts this file (by ``--trust``, ``--weights_only false`` for it, or :data:`TRUST_ENV`)."""
    key = _key(path)
    return key in _trusted or any(_key(e) == key for e in _env_entries() if e not in _OLD_FLAG_VALUES)


@contextmanager
def trust_scope(paths: Sequence[str | os.PathLike] = ()) -> Iterator[None]:
    """Trust ``paths`` (and whatever :func:`trust` adds) for the length of one command, then forget them.

    ``paths`` (the command's ``--trust``) are also added to :data:`TRUST_ENV` meanwhile, so the processes the
    command starts (``kdl pipeline``'s stages, ``kdl sweep``'s trials) trust the same files, and no others.
    """
    saved, saved_env = set(_trusted), os.environ.get(TRUST_ENV)
    keys = [_key(p) for p in paths]
    _trusted.update(keys)
    if keys:
        os.environ[TRUST_ENV] = os.pathsep.join([*(saved_env.split(os.pathsep) if saved_env else []), *keys])
    try:
        yield
    finally:
        _trusted.clear()
        _trusted.update(saved)
        if keys:
            if saved_env is None:
                os.environ.pop(TRUST_ENV, None)
            else:
                os.environ[TRUST_ENV] = saved_env


def pop_trust_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--trust PATH`` / ``--trust=PATH`` (repeatable) off a command line: ``(the rest, the paths)``."""
    rest: list[str] = []
    paths: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--trust":
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise ConfigError("--trust needs a file path (the one checkpoint you trust)")
            paths.append(value)
        elif arg.startswith("--trust="):
            paths.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    for path in paths:
        check_file(path, "--trust")
    return rest, paths


def check_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` as a Path, or a clear error when it is missing or a folder."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {str(path)!r} is a folder; expected a file (e.g. <run>/checkpoints/best.ckpt)")
    if not path.is_file():
        why = ""
        if path.name != "last.ckpt" and (path.parent / "last.ckpt").is_file():
            why = (
                f"; only last.ckpt is in {str(path.parent)!r}: a --trainer.fast_dev_run fit (or one stopped before its "
                "first validation) chooses no best checkpoint. Name last.ckpt, or train briefly with "
                "--trainer.max_epochs 1 --trainer.limit_train_batches 5"
            )
        raise CheckpointError(f"{what} {str(path)!r} does not exist{why}")
    return path


#: the first object ``torch.save`` pickled in its legacy (pre-1.6, non-zip) format
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def file_format(path: str | os.PathLike) -> str:
    """What kind of file ``path`` is: ``"zip"``, ``"legacy"``, ``"pickle"`` or ``"other"``.

    ``"zip"`` is ``torch.save``'s format since PyTorch 1.6, ``"legacy"`` the one before it (still written with
    ``_use_new_zipfile_serialization=False``; it cannot be memory-mapped), ``"pickle"`` a plain ``pickle.dump``.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK" or zipfile.is_zipfile(path):  # a damaged zip too: torch.load then says what is wrong
        return "zip"
    if head[:1] != b"\x80":  # pickle protocol 2+ starts with PROTO
        return "other"
    # the legacy format pickles its magic number first: LONG1 (0x8a), 10 bytes, little-endian
    if head[2:4] == b"\x8a\n" and int.from_bytes(head[4:14], "little") == _LEGACY_MAGIC:
        return "legacy"
    return "pickle"


def _trust_hint(path: Path) -> str:
    hint = f"If you trust where it came from, pass --trust {shlex.quote(str(path))}"
    old = next((e for e in os.environ.get(TRUST_ENV, "").split(os.pathsep) if e in _OLD_FLAG_VALUES), None)
    if old is not None:
        hint += (
            f" ({TRUST_ENV}={old} no longer trusts every file of a command: set it to the "
            f"trusted files' paths, separated by {os.pathsep!r})"
        )
    return hint


def safe_load(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:  # noqa: ANN401 - what torch.load unpickled
    """``torch.load`` on CPU, refusing pickled code unless the user trusts this file (see the module docstring).

    ``mmap`` applies to ``torch.save``'s zip format only; an older file is read whole. A plain pickle (not written
    by ``torch.save``) is refused with what it is and how to convert it.
    """
    import torch

    path = check_file(path, what)
    trust = is_trusted(path)
    kind = file_format(path)
    if kind == "pickle":
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read: it is a plain Python pickle, not a torch.save file. If you trust "
            "it, convert it in Python: torch.save(pickle.load(open(PATH, 'rb')), NEW_PATH), then use NEW_PATH"
        )
    if kind == "other":
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read: it is not a PyTorch checkpoint (neither torch.save's zip "
            "format nor its legacy pickle format); expected a .ckpt written by kdl fit (or a torch.save file)"
        )
    legacy = " (PyTorch's legacy pre-1.6 format)" if kind == "legacy" else ""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"{what} {str(path)!r}{legacy} cannot be read (UnpicklingError: {e})") from None
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "a Python object")
        raise CheckpointError(
            f"{what} {str(path)!r}{legacy} holds more than tensors and plain values ({detail}); opening it could run "
            f"arbitrary code. {_trust_hint(path)}"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure to read is the file's fault
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{what} {str(path)!r}{legacy} cannot be read ({type(e).__name__}: {first})") from None


#: checkpoint key of the run's resolved config (written by callbacks.ResumeState, read by ``kdl`` on resume)
CONFIG_KEY = "kdl_config"
#: checkpoint key of the RNG states (callbacks.ResumeState)
RNG_KEY = "kdl_rng"
#: every task keeps its network as ``self.net``: its weights are the state-dict keys under this prefix
NET_PREFIX = "net."


def net_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The network's own weights out of a task's state dict (the keys under :data:`NET_PREFIX`, prefix removed)."""
    return {k[len(NET_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(NET_PREFIX)}


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint (on CPU); a clear error when missing, unreadable or unsafe."""
    ckpt = safe_load(path, mmap=mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' key)")
    return ckpt


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a plain ``state_dict`` file, or the net's weights out of a ``kdl`` checkpoint."""
    obj = safe_load(path, what="weights file")
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = net_state(obj["state_dict"])
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{str(path)!r} holds no state_dict")
    return obj


def state_mismatch(ours: dict[str, Any], theirs: dict[str, Any], shown: int = 4) -> str:
    """Describe how the state dict ``theirs`` does not fit ``ours``, or return "" when it fits.

    The form is "missing: ...; unexpected: ...; shape differs: ...", with at most ``shown`` keys of each.
    """
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    reshaped = sorted(
        k
        for k in set(ours) & set(theirs)
        if hasattr(ours[k], "shape") and tuple(ours[k].shape) != tuple(getattr(theirs[k], "shape", ()))
    )  # a module's extra state (e.g. a per-sample store) is not a tensor and sizes itself
    return "; ".join(
        f"{name}: {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", reshaped))
        if keys
    )
