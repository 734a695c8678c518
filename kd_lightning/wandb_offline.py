"""Read back what a W&B run logged offline (``WANDB_MODE=offline``), without a W&B server.

An offline run keeps everything in ``wandb/offline-run-*/run-*.wandb``: W&B's record log, a
LevelDB-style log (32 KiB blocks, each record framed by a CRC-32, a length and a type) of
protocol-buffer ``Record`` messages in W&B's own schema (``wandb.proto.wandb_internal_pb2``).
:func:`read_offline_run` returns the run's name and group, its config, its history rows and its
summary, so tests and notebooks can check a run before (or instead of) ``wandb sync``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_lightning.errors import KDLError

_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_CHUNK = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline W&B run logged."""

    path: Path
    name: str = ""
    group: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # type, name, files
    exited: bool = False  # the run's exit record is written: the run was finished and its log is complete

    def scalars(self, key: str) -> list[float]:
        """Every logged value of a scalar ``key``, in logging order."""
        return [row[key] for row in self.history if isinstance(row.get(key), (int, float))]


def _records(data: bytes, path: Path) -> list[bytes]:
    if len(data) < _HEADER.size:
        raise KDLError(f"{str(path)!r} holds no W&B run log header yet ({len(data)} bytes)")
    ident, magic, _version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise KDLError(f"{str(path)!r} is not a W&B run log (header {data[:7]!r})")
    records, pending, pos = [], b"", _HEADER.size
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # the rest of a block too short for a header is padding
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if kind == 0 and length == 0:
            continue
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc or len(chunk) != length:
            break  # a torn tail (the run is still writing or was killed): keep what is whole
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def _put(target: dict[str, Any], item: Any) -> None:  # noqa: ANN401 - a wandb protobuf item (no stubs)
    """Store an item's JSON value under its key, or under its nested keys as nested dicts (media, tables)."""
    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_offline_run(folder: str | os.PathLike) -> OfflineRun:
    """Read ``folder`` (a ``wandb/offline-run-*`` folder, or a folder holding exactly one)."""
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(folder)
    logs = sorted(folder.glob("run-*.wandb")) or sorted(folder.glob("**/offline-run-*/run-*.wandb"))
    if len(logs) != 1:
        raise KDLError(f"expected one offline W&B run under {str(folder)!r}, found {len(logs)}")
    run = OfflineRun(path=logs[0].parent)
    for raw in _records(logs[0].read_bytes(), logs[0]):
        record = pb.Record()  # type: ignore[attr-defined]  # protobuf-generated, no stubs
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run  # a later run record may update only some fields
            run.name, run.group, run.project = (
                r.display_name or run.name,
                r.run_group or run.group,
                r.project or run.project,
            )
            run.tags = list(r.tags) or run.tags
            for item in r.config.update:
                _put(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _put(run.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "artifact":
            a = record.artifact
            files = [entry.path for entry in a.manifest.contents]
            run.artifacts.append({"type": a.type, "name": a.name, "aliases": list(a.aliases), "files": files})
        elif kind == "request" and record.request.WhichOneof("request_type") == "log_artifact":
            a = record.request.log_artifact.artifact
            files = [entry.path for entry in a.manifest.contents]
            run.artifacts.append({"type": a.type, "name": a.name, "aliases": list(a.aliases), "files": files})
        elif kind == "summary":
            for item in record.summary.update:
                _put(run.summary, item)
        elif kind == "exit":
            run.exited = True
    return run


def wait_for_offline_run(folder: str | os.PathLike, timeout: float = 120.0, poll: float = 0.2) -> OfflineRun:
    """:func:`read_offline_run` once the run's log holds its exit record; :class:`KDLError` after ``timeout`` s.

    W&B's service writes the log in its own process and may still be writing when ``wandb.finish()`` returns.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            run: OfflineRun | None = read_offline_run(folder)
        except KDLError:  # no log yet, or its header not written yet
            run = None
        if run is not None and run.exited:
            return run
        if time.monotonic() > deadline:
            seen = "no run log" if run is None else f"{len(run.history)} history rows and no exit record"
            raise KDLError(f"the offline W&B run under {str(folder)!r} was not closed within {timeout:.0f} s ({seen})")
        time.sleep(poll)
