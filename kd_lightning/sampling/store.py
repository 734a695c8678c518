"""The on-disk sample store: shards of uint8 images plus a manifest, written atomically and resumable.

Layout of a store folder::

    manifest.json      settings (checkpoint hashes, rho, seeds, ...), shard list with SHA-256 sums,
                       per-unit progress (for resume) and, once finished, the report (acceptance,
                       label consistency, drop rate per class, cut-offs)
    shard-00000.bin    one shard: the samples of one class (or label value) from consecutive chunks
    samples.bin        per-sample table written when generation finishes: assigned label, teacher
                       output, density ratio, accepted / kept / replaced flags, final label
    filter_hist.png    histogram of the filtering errors with the cut-off(s) (cGAN-KD Fig. 8)

Every file goes through a temporary name and ``os.replace`` (:func:`atomic_write_bytes`), and the
manifest is rewritten after every shard, so a run killed at any moment leaves either the previous or
the next consistent state. Shards use a tiny self-describing binary format (a JSON header naming
each array's dtype, shape and offset, then the raw bytes): unlike ``np.savez``/zip it holds no
timestamps, so the same inputs give the same bytes and a resumed store equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_lightning.errors import KDLError
from kd_lightning.fileio import atomic_write_bytes

MAGIC = b"KDLSHARD1\n"
MANIFEST = "manifest.json"
TABLE = "samples.bin"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"  # atomic_write_bytes's temporary files: a writer killed mid-write leaves one


class StoreError(KDLError):
    """A store that cannot be used: mismatched settings, a corrupt or missing shard."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (checkpoints and shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encode_arrays(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> bytes:
    """Arrays -> deterministic bytes: magic, header length, JSON header, then each array's raw C-order bytes."""
    header, blobs, offset = [], [], 0
    for name, value in arrays.items():
        a = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        a = np.ascontiguousarray(a)
        data = a.tobytes()
        header.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + len(head).to_bytes(8, "little") + head + b"".join(blobs)


def decode_arrays(data: bytes, source: str = "shard") -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_arrays`; a clear error on a malformed file."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise StoreError(f"{source} is not a kd_lightning shard (bad magic)")
    n = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    try:
        header = json.loads(data[start : start + n])
    except ValueError:
        raise StoreError(f"{source} has a corrupt header") from None
    body = memoryview(data)[start + n :]
    out = {}
    for entry in header:
        dtype = np.dtype(entry["dtype"])
        count = int(np.prod(entry["shape"])) if entry["shape"] else 1
        end = entry["offset"] + count * dtype.itemsize
        if end > len(body):
            raise StoreError(f"{source} is truncated (array {entry['name']!r} ends at byte {end} of {len(body)})")
        out[entry["name"]] = np.frombuffer(body[entry["offset"] : end], dtype=dtype).reshape(entry["shape"]).copy()
    return out


def canonical_json(obj: object) -> bytes:
    """Stable JSON bytes (sorted keys, fixed separators; floats round-trip exactly)."""
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


@dataclass
class SampleTable:
    """The per-sample columns of a finished store (row i = the i-th stored sample, shard order)."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]


class SampleStore:
    """A store folder: create or reopen (resume) with given settings, append shards, load samples.

    Args:
        root: the store folder.
        settings: everything that decides the samples (checkpoint hashes, counts, rho, seed, ...);
            reopening with other settings is refused, naming every key that differs.
    """

    def __init__(self, root: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{str(self.root)!r} is a file; a sample store is a folder (name a new or empty one)")
        if settings is not None:
            self._remove_temporary_files()
        if path.is_file():
            try:
                self.manifest = json.loads(path.read_text())
            except ValueError as e:
                raise StoreError(f"{path} is not valid JSON ({e}); delete the store folder to start again") from None
            if settings is not None:
                self.check_settings(dict(settings))
        elif settings is None:
            raise StoreError(
                f"no sample store at {str(self.root)!r} ({MANIFEST} not found); write one with kdl generate"
            )
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise StoreError(
                    f"{str(self.root)!r} exists and is not empty but holds no {MANIFEST}; choose an empty or new folder"
                )
            self.manifest = {
                "format": FORMAT_VERSION,
                "settings": json.loads(json.dumps(dict(settings))),
                "shards": [],
                "progress": {},
                "finished": False,
            }
            self.save()

    def _remove_temporary_files(self) -> None:
        """Delete what a killed writer left: our own ``.tmp-*`` files (never recorded, never read)."""
        if self.root.is_dir():
            for leftover in self.root.glob(f"{TMP_PREFIX}*"):
                if leftover.is_file():
                    leftover.unlink()

    # ------------------------------------------------------------------ settings
    def check_settings(self, settings: dict[str, Any]) -> None:
        ours = self.manifest.get("settings", {})
        theirs = json.loads(json.dumps(settings))
        diffs = [
            f"{k}: store={ours.get(k)!r} now={theirs.get(k)!r}"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)
        ]
        if diffs:
            raise StoreError(
                f"the sample store {str(self.root)!r} was written with other settings; refusing to resume "
                f"(use another output folder, or delete this one): " + "; ".join(diffs)
            )

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def finished(self) -> bool:
        return bool(self.manifest.get("finished"))

    # ------------------------------------------------------------------ writing
    def save(self) -> None:
        """Write the manifest atomically."""
        atomic_write_bytes(str(self.root / MANIFEST), canonical_json(self.manifest))

    def progress(self, unit: str) -> dict[str, Any]:
        return self.manifest["progress"].setdefault(unit, {})

    def add_shard(self, unit: str, arrays: Mapping[str, np.ndarray | torch.Tensor], progress: dict[str, Any]) -> None:
        """Write one shard atomically, then record it and ``unit``'s new progress in the manifest."""
        index = len(self.manifest["shards"])
        name = f"shard-{index:05d}.bin"
        data = encode_arrays(arrays)
        atomic_write_bytes(str(self.root / name), data)
        n = len(next(iter(arrays.values())))
        self.manifest["shards"].append(
            {"file": name, "unit": unit, "n": int(n), "sha256": hashlib.sha256(data).hexdigest()}
        )
        self.manifest["progress"][unit] = progress
        self.save()

    def set_progress(self, unit: str, progress: dict[str, Any]) -> None:
        self.manifest["progress"][unit] = progress
        self.save()

    def write_table(self, columns: Mapping[str, np.ndarray | torch.Tensor], report: dict[str, Any]) -> None:
        """Write the per-sample table and the report, and mark the store finished."""
        data = encode_arrays(columns)
        atomic_write_bytes(str(self.root / TABLE), data)
        self.manifest["table"] = {"file": TABLE, "sha256": hashlib.sha256(data).hexdigest()}
        self.manifest["report"] = report
        self.manifest["finished"] = True
        self.save()

    # ------------------------------------------------------------------ reading
    def _read_checked(self, name: str, expected: str) -> bytes:
        path = self.root / name
        if not path.is_file():
            raise StoreError(f"store {str(self.root)!r}: {name} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise StoreError(
                f"store {str(self.root)!r}: {name} is corrupt (its SHA-256 differs from the manifest's); "
                "regenerate it by deleting the store and running kdl generate again"
            )
        return data

    def read_shard(self, i: int, verify: bool = True) -> dict[str, np.ndarray]:
        entry = self.manifest["shards"][i]
        data = (
            self._read_checked(entry["file"], entry["sha256"]) if verify else (self.root / entry["file"]).read_bytes()
        )
        return decode_arrays(data, f"{self.root / entry['file']}")

    def shards_of(self, unit: str) -> list[int]:
        return [i for i, s in enumerate(self.manifest["shards"]) if s["unit"] == unit]

    def load_images(self, verify: bool = True) -> np.ndarray:
        """Every stored image (uint8 N x C x H x W, shard order), every shard checked against its checksum."""
        parts = [self.read_shard(i, verify)["image"] for i in range(len(self.manifest["shards"]))]
        return np.concatenate(parts) if parts else np.zeros((0, 1, 1, 1), np.uint8)

    def load_column(self, name: str, verify: bool = True) -> np.ndarray:
        parts = [self.read_shard(i, verify)[name] for i in range(len(self.manifest["shards"]))]
        return np.concatenate(parts)

    def table(self) -> SampleTable:
        """The per-sample table of a finished store (checked against its checksum)."""
        if not self.finished:
            raise StoreError(f"store {str(self.root)!r} is not finished; resume it with kdl generate")
        info = self.manifest["table"]
        return SampleTable(decode_arrays(self._read_checked(info["file"], info["sha256"]), info["file"]))

    @property
    def report(self) -> dict[str, Any]:
        return self.manifest.get("report", {})


def open_store(root: str | os.PathLike) -> SampleStore:
    """An existing, finished store (for DataModules and notebooks)."""
    store = SampleStore(root)
    if not store.finished:
        raise StoreError(f"store {str(root)!r} is not finished; resume it with kdl generate")
    return store


__all__ = ["SampleStore", "SampleTable", "StoreError", "decode_arrays", "encode_arrays", "open_store", "sha256_file"]
