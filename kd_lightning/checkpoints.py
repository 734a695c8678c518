"""Reading checkpoints and weight files safely, with clear errors.

Every file is read with ``torch.load(weights_only=True)``: tensors, containers and plain values only,
so a checkpoint from someone else cannot run code when it is opened (a pickle can name any callable).
kdl's own checkpoints hold nothing else. A file that needs more (an old or foreign checkpoint that
pickled objects) is refused with a message; whoever trusts it opts in with Lightning's own
``--weights_only false`` (``kdl fit|validate|test|predict``, ``kdl sample``), which sets
:data:`TRUST_ENV` for the process, or by setting that variable.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from kd_lightning.errors import CheckpointError

#: set to 1 to read checkpoints with full unpickling (only for files you trust)
TRUST_ENV = "KDL_TRUST_CHECKPOINTS"


def trusted() -> bool:
    """Whether the user opted in to full unpickling of checkpoints for this process."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0", "false", "False")


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


def safe_load(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:  # noqa: ANN401 - what torch.load unpickled
    """``torch.load`` on CPU, refusing pickled code unless the user opted in (see the module docstring)."""
    path = check_file(path, what)
    trust = trusted()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"{what} {str(path)!r} cannot be read (UnpicklingError: {e})") from None
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "a Python object")
        raise CheckpointError(
            f"{what} {str(path)!r} holds more than tensors and plain values ({detail}); opening it could run "
            f"arbitrary code. If you trust where it came from, pass --weights_only false (or set {TRUST_ENV}=1)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure to read is the file's fault
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{what} {str(path)!r} cannot be read ({type(e).__name__}: {first})") from None


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
