"""Checkpoints written atomically: a crash while saving never leaves a half-written ``last.ckpt``."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.partial`` in the same folder, flush it to disk, then ``os.replace`` it.

    ``os.replace`` is atomic on POSIX file systems, so readers (and ``--ckpt_path last``) see either
    the previous complete file or the new complete file. Remote paths (``s3://`` ...) fall back to
    Lightning's default writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = path.removeprefix("file://")
        get_filesystem(path).makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.partial"
        try:
            self._write(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(os.path.dirname(path) or ".")

    def _write(self, checkpoint: dict[str, Any], tmp: str) -> None:
        """Serialise ``checkpoint`` into ``tmp`` and make it durable."""
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
