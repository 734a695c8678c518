"""Checkpoints written atomically: a crash while saving never leaves a half-written ``last.ckpt``."""

from __future__ import annotations

import errno
import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kd_lightning.errors import KDLError
from kd_lightning.fileio import atomic_replace


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.partial`` in the same folder, flush it to disk, then ``os.replace`` it.

    The replace is :func:`kd_lightning.fileio.atomic_replace`.

    ``os.replace`` is atomic on POSIX file systems, so readers (and ``--ckpt_path last``) see either
    the previous complete file or the new complete file. Remote paths (``s3://`` ...) fall back to
    Lightning's default writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: object | None = None
    ) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = path.removeprefix("file://")
        try:
            atomic_replace(path, lambda tmp: self._write(checkpoint, tmp), tmp=f"{path}.partial")
        except BaseException as e:
            if _is_disk_full(e):
                name = os.path.basename(path)
                kept = f"the previous {name} is intact" if os.path.exists(path) else f"no {name} was written"
                raise DiskFullError(f"no space left on device while writing {path!r}; {kept}") from None
            raise

    def _write(self, checkpoint: dict[str, Any], tmp: str) -> None:
        """Serialise ``checkpoint`` into ``tmp`` and make it durable."""
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


class DiskFullError(KDLError, OSError):
    """The disk filled up while a checkpoint was written (the previous file is untouched)."""


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain (torch's writer reports it as a RuntimeError from C++)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "unexpected pos" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
