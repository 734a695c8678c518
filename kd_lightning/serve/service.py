"""The teacher's side of the black-box protocol, without HTTP: validate a batch, answer it, log what was charged.

A request carries a ``.npy`` array of images (uint8 in 0..255, or float16/float32 in [0, 1]; N x C x H x W with
the teacher's channels and size) and optionally a request id. A request id seen before is an idempotent
retry: its answers are replayed (``X-Replayed: true``) and not charged again; the same id with other images
is a 409. Concurrent requests with one id wait for the first. Every answered request is one JSON line in the
server's log (``charged`` true or false, the SHA-256 of every image, bytes in and out): the server's own
record of what it was paid for.

The record of answered request ids (:class:`ReplayRecord`, SQLite) lives in a file beside the log when there is
one (``<log>.replays.sqlite``, or ``replay_path``), so a restarted server (``kdl pipeline`` restarts its
background teacher on every rerun) replays a client's pending requests instead of charging them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.teachers.frozen import FrozenTeacher
from kd_lightning.teachers.wire import (
    CHARGED_HEADER,
    REPLAYED_HEADER,
    REQUEST_ID_HEADER,
    RESPONSES,
    WIRE_DTYPES,
    Responses,
    decode_array,
    encode_array,
    from_wire,
    image_hashes,
)


def preprocess_note(checkpoint: dict[str, Any], image_size: int | None) -> str | None:
    """How the teacher's training data reached ``image_size`` (zero padding or resizing), from its saved recipe."""
    from kd_lightning.checkpoints import CONFIG_KEY

    data = (checkpoint.get(CONFIG_KEY) or {}).get("data") or {}
    name = str(data.get("class_path") or "").rsplit(".", 1)[-1]
    import kd_lightning.data as datamodules

    native = getattr(getattr(datamodules, name, None), "native_size", None)
    if not image_size or not native or native == image_size:
        return None if not image_size else f"images of {image_size}x{image_size} as they are"
    mode = ((data.get("init_args") or {}).get("resize_mode")) or "pad"
    if mode == "pad" and image_size > native:
        extra = image_size - native
        return (
            f"{name} images are {native}x{native}: pad them with zeros to {image_size}x{image_size} "
            f"({extra // 2} pixels left/top, {extra - extra // 2} right/bottom), as in training"
        )
    return f"{name} images are {native}x{native}: resize them to {image_size}x{image_size} (bilinear), as in training"


def default_replay_path(log_path: str | os.PathLike) -> Path:
    """Where a server logging to ``log_path`` keeps its replays: ``server.jsonl`` -> ``server.replays.sqlite``."""
    return Path(log_path).with_suffix(".replays.sqlite")


class ReplayRecord:
    """Every answered request id with its content digest; the newest ``window`` also with their answer.

    In memory (``path=None``) or in an SQLite file that outlives the process: a record is committed (and synced)
    before its answer leaves the server, so whatever a client may have been charged for can be replayed after a
    restart. Request ids are never forgotten: a client re-sends a pending request however many other requests the
    server answered meanwhile (other clients, other pipeline stages), and an id older than the window is answered
    again by the teacher, free, instead of being charged twice. Only the answers are dropped beyond the window: they
    are what takes room (a request id with its digest is about 150 bytes, less than its line in the server's log).
    Callers serialise access (the service holds its lock).
    """

    def __init__(self, path: str | os.PathLike | None = None, window: int = 1_000) -> None:
        self.path = None if path is None else Path(path)
        self.window = window
        try:
            self._db = sqlite3.connect(":memory:" if path is None else os.fspath(path), check_same_thread=False)
            with self._db:
                if path is not None:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("PRAGMA synchronous=FULL")
                # an answer dropped beyond the window is the empty blob (the column is NOT NULL in older files)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS answered (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "request_id TEXT UNIQUE NOT NULL, digest TEXT NOT NULL, answer BLOB NOT NULL)"
                )
                last = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM answered").fetchone()[0]
                self._db.execute(  # once per start: a smaller window than the file's last run had
                    "UPDATE answered SET answer = x'' WHERE seq <= ? AND length(answer) > 0", (last - window,)
                )
        except sqlite3.Error as e:
            raise ConfigError(
                f"replay record {str(path)!r} cannot be opened ({e}); expected a writable SQLite file "
                "(kdl serve-teacher keeps it beside --log, or at --replay-db)"
            ) from None

    def get(self, request_id: str) -> tuple[str, bytes | None] | None:
        """``(digest, answer)`` of an answered request id (``answer`` ``None`` beyond the window), or ``None``."""
        row = self._db.execute("SELECT digest, answer FROM answered WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else (row[0], bytes(row[1]) or None)

    def put(self, request_id: str, digest: str, answer: bytes) -> None:
        """Remember an answered request (committed before returning); the answer that leaves the window is dropped."""
        with self._db:
            cur = self._db.execute(
                "INSERT INTO answered (request_id, digest, answer) VALUES (?, ?, ?)", (request_id, digest, answer)
            )
            self._db.execute("UPDATE answered SET answer = x'' WHERE seq = ?", ((cur.lastrowid or 0) - self.window,))

    def __len__(self) -> int:
        """How many request ids are remembered (all of them)."""
        return int(self._db.execute("SELECT COUNT(*) FROM answered").fetchone()[0])

    def answers_kept(self) -> int:
        """How many of them still hold their answer (at most ``window``)."""
        return int(self._db.execute("SELECT COUNT(*) FROM answered WHERE length(answer) > 0").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class TeacherService:
    """Answers image batches with a frozen classifier's probabilities (soft) or class ids (hard).

    Args:
        teacher: the frozen classifier.
        responses: ``"soft"`` or ``"hard"``.
        image_size: expected image side (``None``: any).
        max_batch: most images per request (more: 413).
        log_path: JSON-lines log of every answered request (``None``: no log).
        idempotency_window: how many recent answers are kept for replays; every request id is remembered, and an
            older one is answered again by the teacher, free (:class:`ReplayRecord`).
        replay_path: SQLite file of the answered request ids (default: beside ``log_path``; in memory without a log).
        preprocess: how a client should bring its images to ``image_size`` (shown by ``/health``).
    """

    def __init__(
        self,
        teacher: FrozenTeacher,
        responses: Responses = "soft",
        image_size: int | None = None,
        max_batch: int = 1024,
        log_path: str | os.PathLike | None = None,
        idempotency_window: int = 1_000,
        replay_path: str | os.PathLike | None = None,
        preprocess: str | None = None,
    ) -> None:
        if teacher.task != "classification" or not teacher.num_classes:
            raise ValueError(f"{teacher.describe()} is not a classifier; only classifiers can be served")
        if responses not in RESPONSES:
            raise ValueError(f"responses={responses!r}; expected 'soft' or 'hard'")
        self.teacher = teacher
        self.responses = responses
        self.num_classes = int(teacher.num_classes)
        self.in_channels = int(teacher.normalize.mean.shape[1])
        self.image_size = image_size
        self.max_batch = max_batch
        self.log_path = log_path
        self.window = idempotency_window
        self.preprocess = preprocess
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        if replay_path is None and log_path is not None:
            replay_path = default_replay_path(log_path)
        self._done = ReplayRecord(replay_path, idempotency_window)  # request id -> (content digest, answer)
        self._running: dict[str, threading.Event] = {}
        self.images_charged = 0

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike, **kwargs: Any) -> TeacherService:
        from kd_lightning.checkpoints import load_checkpoint

        loaded = load_checkpoint(ckpt)
        hp = loaded.get("hyper_parameters", {})
        kwargs.setdefault("image_size", hp.get("image_size"))
        kwargs.setdefault("preprocess", preprocess_note(loaded, hp.get("image_size")))
        return cls(FrozenTeacher.from_checkpoint(ckpt), **kwargs)

    def info(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "responses": self.responses,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "input": "a .npy N x C x H x W batch, uint8 0..255 or float in [0, 1], not normalised (the teacher "
            "normalises)",
            "preprocess": self.preprocess,
            "max_batch": self.max_batch,
            "dtypes": list(WIRE_DTYPES),
        }

    # ------------------------------------------------------------------ one request
    def handle(self, body: bytes, request_id: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        """``(status, body, headers)``: 200 with ``.npy`` answers, or a 4xx with a JSON ``{"detail": ...}``."""
        try:
            images = decode_array(body)
        except ValueError as e:
            return _error(400, f"the body must be a .npy array of images: {e}")
        problem = self._check(images)
        if problem is not None:
            return problem
        if request_id is not None and not (0 < len(request_id) <= 128 and request_id.isprintable()):
            return _error(400, f"{REQUEST_ID_HEADER} must be 1 to 128 printable characters")
        digest = hashlib.sha256(body).hexdigest()
        if request_id is None:
            return self._answer(images, body, None, digest)
        while True:
            with self._lock:
                done = self._done.get(request_id)
                running = self._running.get(request_id)
                if done is None and running is None:
                    self._running[request_id] = threading.Event()
                    break
            if done is not None:
                if done[0] != digest:
                    return _error(409, f"request id {request_id} was already used for other images")
                # answered before: the kept answer, or (an id older than the window) the teacher answers again
                payload = done[1] if done[1] is not None else self._predict(images)
                self._log(request_id, images, False, len(body), len(payload))
                return 200, payload, {REPLAYED_HEADER: "true", CHARGED_HEADER: "0"}
            assert running is not None
            running.wait()  # the same request is being answered (a client retry after a timeout): replay it
        try:
            return self._answer(images, body, request_id, digest)
        finally:
            with self._lock:
                self._running.pop(request_id).set()

    def _check(self, images: np.ndarray) -> tuple[int, bytes, dict[str, str]] | None:
        if images.dtype.name not in WIRE_DTYPES:
            return _error(422, f"images have dtype {images.dtype}; expected one of {', '.join(WIRE_DTYPES)}")
        if not images.dtype.isnative:
            return _error(
                422,
                f"images have byte order {images.dtype.str!r} (not this server's); send "
                f"{images.dtype.newbyteorder('=').str!r} (little-endian, numpy's default here)",
            )
        if images.ndim != 4:
            return _error(422, f"images have shape {images.shape}; expected N x C x H x W")
        n, c, h, w = images.shape
        if n == 0:
            return _error(422, "the batch is empty")
        if n > self.max_batch:
            return _error(413, f"{n} images in one request; the maximum batch is {self.max_batch}")
        if c != self.in_channels:
            return _error(422, f"images have {c} channels; the teacher takes {self.in_channels}")
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            return _error(422, f"images are {h}x{w}; the teacher takes {self.image_size}x{self.image_size}")
        if images.dtype != np.uint8:
            if not np.isfinite(images).all():
                return _error(422, "images hold NaN or infinite values")
            if images.min() < 0 or images.max() > 1:
                return _error(422, f"float images must be in [0, 1]; got [{images.min():.4g}, {images.max():.4g}]")
        return None

    def _answer(
        self, images: np.ndarray, body: bytes, request_id: str | None, digest: str
    ) -> tuple[int, bytes, dict[str, str]]:
        payload = self._predict(images)
        with self._lock:
            self.images_charged += len(images)
            if request_id is not None:
                self._done.put(request_id, digest, payload)
        self._log(request_id, images, True, len(body), len(payload))
        return 200, payload, {REPLAYED_HEADER: "false", CHARGED_HEADER: str(len(images))}

    def _predict(self, images: np.ndarray) -> bytes:
        """The teacher's answers to a checked batch, as ``.npy`` bytes."""
        with torch.inference_mode():
            logits = self.teacher(from_wire(images))
        if self.responses == "soft":
            out = torch.softmax(logits.float(), dim=-1).numpy().astype(np.float32)
        else:
            out = logits.argmax(-1).numpy().astype(np.int64)
        return encode_array(out)

    def _log(self, request_id: str | None, images: np.ndarray, charged: bool, bytes_in: int, bytes_out: int) -> None:
        if self.log_path is None:
            return
        record = {
            "time": round(time.time(), 3),
            "request_id": request_id,
            "n": len(images),
            "charged": charged,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "hashes": [h.hex() for h in image_hashes(images)],
        }
        line = (json.dumps(record) + "\n").encode()
        with self._log_lock:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


def _error(status: int, detail: str) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps({"detail": detail}).encode(), {"Content-Type": "application/json"}


def read_server_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a server log (one JSON object per line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
