"""What the pipeline remembers between runs: content hashes, and each stage's record.

The record is ``<dir>/pipeline/<name>.json``: status, config hash, input and output hashes, attempts, time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import datetime, timezone
from typing import Any

from kd_lightning.pipeline.schema import STATE_DIR, Step, sha


def now() -> str:
    """The time now, UTC, ISO 8601 to the second (records and logs)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_sha(path: str) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Hashes:
    """Content hashes of files and folders, reused while a path's size and mtime are unchanged."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[str, str]] = {}  # abs path -> (signature, sha256)

    def learn(self, record: dict[str, Any]) -> None:
        """Reuse the output hashes a stage recorded (so a cached run reads no checkpoint)."""
        for out in (record.get("outputs") or {}).values():
            if isinstance(out, dict) and {"path", "signature", "sha256"} <= set(out):
                self.known[os.path.abspath(out["path"])] = (out["signature"], out["sha256"])

    @staticmethod
    def _files(path: str) -> list[tuple[str, str]]:
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if root == path and STATE_DIR in dirs:  # the pipeline's own record and log are not content
                dirs.remove(STATE_DIR)
            for f in sorted(files):
                full = os.path.join(root, f)
                found.append((os.path.relpath(full, path), full))
        return found

    def signature(self, path: str) -> str | None:
        if os.path.isfile(path):
            st = os.stat(path)
            return f"file:{st.st_size}:{st.st_mtime_ns}"
        if os.path.isdir(path):
            parts = [f"{rel}:{os.stat(full).st_size}:{os.stat(full).st_mtime_ns}" for rel, full in self._files(path)]
            return "dir:" + sha("\n".join(parts))
        return None

    def entry(self, path: str) -> dict[str, Any] | None:
        """``{"path", "signature", "sha256"}`` of a file or folder, or None when it does not exist."""
        sig = self.signature(path)
        if sig is None:
            return None
        key = os.path.abspath(path)
        cached = self.known.get(key)
        if cached is not None and cached[0] == sig:
            return {"path": path, "signature": sig, "sha256": cached[1]}
        if sig.startswith("file:"):
            digest = file_sha(path)
        else:
            digest = sha("\n".join(f"{rel}\0{file_sha(full)}" for rel, full in self._files(path)))
        self.known[key] = (sig, digest)
        return {"path": path, "signature": sig, "sha256": digest}

    def sha(self, path: str) -> str | None:
        e = self.entry(path)
        return None if e is None else e["sha256"]


def load_record(path: str) -> dict[str, Any] | None:
    """A record file's content, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def read_record(step: Step) -> dict[str, Any] | None:
    """The stage's record; else a finished record of the same resolved config in its folder, under another name.

    Two pipelines may name one run differently (seed 1's ``baseline`` is seed 0's ``guide`` in
    recipes/pipelines/aikd_fashion_mnist_overfit.yaml): it is trained once and both skip it.
    """
    rec = load_record(step.state_path)
    if rec is not None:
        return rec
    folder = os.path.dirname(step.state_path)
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(folder)):
            other = load_record(os.path.join(folder, name)) if name.endswith(".json") else None
            if other and other.get("status") == "done" and other.get("config_hash") == step.config_hash:
                return other
    return None


class State:
    """The records of a pipeline's stages and the hashes of what they consume and make."""

    def __init__(self, steps: list[Step]) -> None:
        self.by_name = {s.name: s for s in steps}
        self.hashes = Hashes()
        self.records: dict[str, dict[str, Any] | None] = {}
        for s in steps:
            self.records[s.name] = rec = read_record(s)
            if rec:
                self.hashes.learn(rec)

    def write_record(self, step: Step, rec: dict[str, Any]) -> None:
        from kd_lightning.fileio import atomic_write_bytes

        atomic_write_bytes(step.state_path, (json.dumps(rec, indent=2, sort_keys=True) + "\n").encode())
        self.records[step.name] = rec

    def fingerprint(self, step: Step) -> str | None:
        """What a ``${stage.dir}`` / ``${stage.url}`` reference consumes: the stage's config, inputs and outputs."""
        if step.background:
            inputs = self.input_hashes(step)
            return None if None in inputs.values() else sha(json.dumps([step.config_hash, inputs], sort_keys=True))
        rec = self.records.get(step.name)
        return rec.get("fingerprint") if rec and rec.get("status") == "done" else None

    def input_hashes(self, step: Step) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for ref in step.refs:
            name, attr = ref.split(".", 1)
            producer = self.by_name[name]
            found[ref] = (
                self.fingerprint(producer) if attr in ("dir", "url") else self.hashes.sha(producer.artifacts[attr])
            )
        for path in step.paths:
            found[path] = self.hashes.sha(path)
        return found

    def outputs(self, step: Step) -> dict[str, Any]:
        """The hash entries of the stage's file outputs that exist now (``best``, ``last``, declared outputs)."""
        found: dict[str, Any] = {}
        for attr, path in step.artifacts.items():
            if attr in ("dir", "url"):
                continue
            entry = self.hashes.entry(path)
            if entry is not None:
                found[attr] = entry
        return found
