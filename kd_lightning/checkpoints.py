"""Reading checkpoints and weight files with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kd_lightning.errors import CheckpointError


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint (on CPU); a clear error when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' key)")
    return ckpt


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a plain ``state_dict`` file, or the net's weights out of a ``kdl`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"weights file {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = {k[len("net.") :]: v for k, v in obj["state_dict"].items() if k.startswith("net.")}
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{str(path)!r} holds no state_dict")
    return obj
