"""The query journal: an append-only, CRC-framed binary record of every paid request, its replay and repair.

Each request is first journalled as an *intent* (request id, image hashes and the request body), then sent with
the request id as an idempotency key, then its *answer* is journalled. Records are CRC-framed and appended with
one ``write`` + ``fsync``; a torn tail (a crash mid-write) is cut off on the next open. A run that restarts
re-sends its pending intents with the same request id (the server replays them without charging) and takes every
journalled answer from the journal: nothing paid is lost, nothing is paid twice.

:func:`check_journal` and :func:`repair_journal` are ``kdl journal check|repair`` (:mod:`.journal_tool`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.teachers.wire import decode_array, encode_array


class JournalError(KDLError):
    """The query journal is corrupt (not just a torn tail) or belongs to another teacher."""


_MAGIC = b"KDLJ"
_HEAD = struct.Struct("<4scII")  # magic, kind, payload length, crc32 of the payload
_INTENT, _ANSWER = b"I", b"A"
_KINDS = (b"H", _INTENT, _ANSWER)


@dataclass
class _Intent:
    rid: bytes
    hashes: list[bytes]
    body: bytes


class QueryJournal:
    """Append-only, CRC-framed record of every paid request (intent before sending, answer after).

    Shared by threads and processes through an ``fcntl`` lock on ``<path>.lock``; each holder reads the
    records the others appended (:meth:`refresh`) before deciding anything.

    Args:
        path: the journal file (created by ``mode="append"`` when missing).
        fingerprint: what the journal must have been written for (answer type and wire format); ``None``
            accepts any (``kdl journal check`` reads it from the file).
        mode: ``"append"`` (a client: the file is locked, created when missing, and a torn tail, the
            incomplete last record a crash mid-append leaves, is cut) or ``"read"`` (inspection: the file is
            opened read-only and never written, a torn tail is skipped, not cut).

    A damaged record followed by valid ones is corruption, not a torn tail: :class:`JournalError` names its
    byte offset and the file is left as it is (``kdl journal repair`` keeps every readable record).
    """

    def __init__(
        self, path: str | os.PathLike, fingerprint: str | None, mode: Literal["append", "read"] = "append"
    ) -> None:
        if mode not in ("append", "read"):
            raise ConfigError(f"journal mode={mode!r}; expected 'append' or 'read'")
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.mode = mode
        self.written_for: str | None = None  # the fingerprint in the file's header record
        self.records = 0
        self.torn_tail = 0  # bytes of an incomplete last record (cut in append mode, skipped in read mode)
        self._offset = 0
        self.answers: dict[bytes, np.ndarray] = {}
        self.pending: dict[bytes, _Intent] = {}
        self._intents: set[bytes] = set()
        self._answered: set[bytes] = set()
        self.spent = 0  # images in every intent (paid or in flight), and in answers whose intent is lost
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock_fd = -1
        if mode == "read":
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise JournalError(f"cannot read query journal {str(self.path)!r}: {e.strerror}") from None
            with contextlib.suppress(OSError):  # share the writers' lock when there is one; never create it
                self._lock_fd = os.open(str(self.path) + ".lock", os.O_RDONLY)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            with self.locked():
                if os.fstat(self._fd).st_size == 0 and mode == "append" and fingerprint is not None:
                    self._append(b"H", fingerprint.encode())
                    self.written_for = fingerprint
                    self.records = 1
                else:
                    self.refresh()
                    if self.written_for is None:
                        raise JournalError(f"{str(self.path)!r} is not a query journal (no header record)")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self._lock_fd < 0:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH if self.mode == "read" else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Read the records appended since the last call (call with the lock held).

        A torn tail is cut (append mode) or skipped (read mode); a damaged record with valid records after it
        raises :class:`JournalError` and nothing is written.
        """
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        data = os.pread(self._fd, size - self._offset, self._offset)
        records, bad = scan_frames(data)
        if bad is not None and not is_torn_tail(data, bad):
            raise JournalError(
                f"query journal {str(self.path)!r} is corrupt at byte {self._offset + bad} (a damaged record "
                "with valid records after it); the file was left as it is. `kdl journal check PATH` lists the "
                "damage, `kdl journal repair PATH` keeps every readable record (after a backup)"
            )
        for kind, start, end in records:
            self._apply(kind, data[start:end])
            self.records += 1
        pos = len(data) if bad is None else bad
        if pos < len(data):  # a torn tail: only the last writer can have left it, and it died mid-append
            self.torn_tail = len(data) - pos
            if self.mode == "append":
                os.ftruncate(self._fd, self._offset + pos)
                self.torn_tail = 0
        self._offset += pos

    def _apply(self, kind: bytes, payload: bytes) -> None:
        if kind == b"H":
            theirs = payload.decode(errors="replace")
            if self.fingerprint is not None and theirs != self.fingerprint:
                raise JournalError(
                    f"query journal {str(self.path)!r} was written for {theirs!r}, not {self.fingerprint!r}; "
                    "use another journal path for another teacher or response type"
                )
            self.written_for = theirs
            return
        rid, n = payload[:16], struct.unpack_from("<I", payload, 16)[0]
        hashes = [payload[20 + 32 * i : 52 + 32 * i] for i in range(n)]
        rest = payload[20 + 32 * n :]
        if kind == _INTENT:
            if rid not in self._intents:
                self._intents.add(rid)
                self.spent += n
            if rid not in self._answered:
                self.pending[rid] = _Intent(rid, hashes, rest)
        elif kind == _ANSWER:
            up, down = struct.unpack_from("<QQ", rest, 0)
            answers = decode_array(rest[16:])
            for h, a in zip(hashes, answers):
                self.answers[h] = a
            self.pending.pop(rid, None)
            if rid not in self._answered:  # a duplicate answer record (a replay) adds nothing
                self._answered.add(rid)
                self.bytes_up += up
                self.bytes_down += down
                if rid not in self._intents:  # its intent was lost (a repaired journal): it was paid all the same
                    self._intents.add(rid)
                    self.spent += n
        else:
            raise JournalError(f"query journal {str(self.path)!r} holds an unknown record kind {kind!r}")

    # ------------------------------------------------------------------ writing (lock held)
    def _append(self, kind: bytes, payload: bytes) -> None:
        if self.mode != "append":
            raise JournalError(f"query journal {str(self.path)!r} was opened for reading only")
        frame = _frame(kind, payload)
        written = os.write(self._fd, frame)
        if written != len(frame):  # pragma: no cover - a full disk
            raise JournalError(f"short write to {str(self.path)!r} ({written} of {len(frame)} bytes)")
        os.fsync(self._fd)
        self._offset += len(frame)

    def add_intent(self, rid: bytes, hashes: list[bytes], body: bytes) -> None:
        payload = rid + struct.pack("<I", len(hashes)) + b"".join(hashes) + body
        self._append(_INTENT, payload)
        self._apply(_INTENT, payload)
        self.records += 1

    def add_answer(self, rid: bytes, hashes: list[bytes], answers: np.ndarray, up: int, down: int) -> None:
        payload = (
            rid
            + struct.pack("<I", len(hashes))
            + b"".join(hashes)
            + struct.pack("<QQ", up, down)
            + encode_array(answers)
        )
        self._append(_ANSWER, payload)
        self._apply(_ANSWER, payload)
        self.records += 1


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(_MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def _frame_at(data: bytes, pos: int) -> int | None:
    """The end of the valid record starting at ``pos`` (magic, known kind, whole, CRC right), else ``None``."""
    if len(data) - pos < _HEAD.size:
        return None
    magic, kind, n, crc = _HEAD.unpack_from(data, pos)
    end = pos + _HEAD.size + n
    if magic != _MAGIC or kind not in _KINDS or end > len(data) or zlib.crc32(data[pos + _HEAD.size : end]) != crc:
        return None
    return end


def scan_frames(data: bytes) -> tuple[list[tuple[bytes, int, int]], int | None]:
    """The valid records from the start of ``data`` (kind, payload start, end), and where the first bad one starts."""
    out: list[tuple[bytes, int, int]] = []
    pos = 0
    while pos < len(data):
        end = _frame_at(data, pos)
        if end is None:
            return out, pos
        out.append((data[pos + 4 : pos + 5], pos + _HEAD.size, end))
        pos = end
    return out, None


def _next_frame(data: bytes, pos: int) -> int | None:
    """The start of the first valid record after ``pos`` (found by its magic), else ``None``."""
    at = data.find(_MAGIC, pos + 1)
    while at >= 0:
        if _frame_at(data, at) is not None:
            return at
        at = data.find(_MAGIC, at + 1)
    return None


def is_torn_tail(data: bytes, bad: int) -> bool:
    """Whether the damage at ``bad`` is a torn tail: no valid record after it, and not a whole record gone bad.

    A crash mid-append leaves a last record shorter than its header says (or a header cut short, or a block of
    zeros); a record whose header is whole and whose length ends exactly at the end of the file is complete,
    so a CRC that fails there is a changed byte, not a torn write.
    """
    if _next_frame(data, bad) is not None:
        return False
    if len(data) - bad >= _HEAD.size:
        _magic, kind, n, _crc = _HEAD.unpack_from(data, bad)
        if kind in _KINDS and bad + _HEAD.size + n == len(data):
            return False
    return True


@dataclass
class JournalCheck:
    """What ``kdl journal check`` found: readable records, damaged byte ranges and whether the tail is torn."""

    path: str
    size: int
    written_for: str | None
    records: int
    answers: int
    pending: int
    spent: int
    damaged: list[tuple[int, int]]  # [start, end) byte ranges no valid record covers
    torn_tail: bool  # the only damage is an incomplete last record (cut by the next append-mode open)

    @property
    def ok(self) -> bool:
        return not self.damaged or self.torn_tail

    def describe(self) -> str:
        head = (
            f"{self.path}: {self.records} readable records ({self.answers} answered images, {self.pending} pending "
            f"requests, {self.spent} images paid), written for {self.written_for!r}"
        )
        if not self.damaged:
            return head + "; no damage"
        if self.torn_tail:
            start, end = self.damaged[0]
            return head + f"; a torn tail at byte {start} ({end - start} bytes; a client cuts it when it opens)"
        ranges = ", ".join(f"bytes {a}-{b - 1}" for a, b in self.damaged)
        lost = sum(b - a for a, b in self.damaged)
        return head + f"; CORRUPT: {lost} unreadable bytes at {ranges}; `kdl journal repair` keeps the rest"


def _salvage(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every valid record of ``data`` as (start, end) frame ranges, skipping damage; and the damaged ranges."""
    frames: list[tuple[int, int]] = []
    damaged: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data):
        end = _frame_at(data, pos)
        if end is not None:
            frames.append((pos, end))
            pos = end
            continue
        nxt = _next_frame(data, pos)
        stop = len(data) if nxt is None else nxt
        damaged.append((pos, stop))
        pos = stop
    return frames, damaged


def check_journal(path: str | os.PathLike) -> JournalCheck:
    """Read a journal without writing anything and say what is readable and what is damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JournalError(f"cannot read query journal {str(path)!r}: {e.strerror}") from None
    if not data.startswith(_MAGIC):
        raise JournalError(f"{str(path)!r} is not a query journal (it does not start with a journal record)")
    frames, damaged = _salvage(data)
    probe = _JournalReplay(path)
    for start, end in frames:
        probe.apply(data[start + 4 : start + 5], data[start + _HEAD.size : end])
    torn = len(damaged) == 1 and damaged[0][1] == len(data) and is_torn_tail(data, damaged[0][0])
    return JournalCheck(
        str(path),
        len(data),
        probe.written_for,
        len(frames),
        len(probe.answers),
        len(probe.pending),
        probe.spent,
        damaged,
        torn,
    )


class _JournalReplay(QueryJournal):
    """A journal's records applied in memory (no file), for :func:`check_journal`."""

    def __init__(self, path: Path) -> None:  # no super().__init__: nothing is opened
        self.path, self.fingerprint, self.mode, self.written_for = path, None, "read", None
        self.answers, self.pending, self._intents, self._answered = {}, {}, set(), set()
        self.spent = self.bytes_up = self.bytes_down = 0

    def apply(self, kind: bytes, payload: bytes) -> None:
        with contextlib.suppress(JournalError, ValueError, struct.error):  # a valid frame with a bad payload
            self._apply(kind, payload)


def repair_journal(
    path: str | os.PathLike, backup: str | os.PathLike | None = None
) -> tuple[JournalCheck, Path | None]:
    """Keep every readable record of a damaged journal; the original is copied to ``backup`` first.

    ``backup`` defaults to ``<path>.corrupt-<UTC time>``. Holds the writers' lock throughout, so a client
    cannot append meanwhile (run it while no client has the journal open: the repaired file is a new file).
    Returns what was found (before the repair) and the backup's path (``None``: nothing to repair, nothing
    written).
    """
    from kd_lightning.fileio import atomic_write_bytes

    path = Path(path)
    check_journal(path)  # not a journal: say so before creating anything
    lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        found = check_journal(path)
        if not found.damaged:
            return found, None
        data = path.read_bytes()
        frames, _damaged = _salvage(data)
        if not frames or data[frames[0][0] + 4 : frames[0][0] + 5] != b"H":
            raise JournalError(
                f"{str(path)!r} has no readable header record; it is not a query journal or its start is lost"
            )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        saved = Path(backup) if backup is not None else path.with_name(f"{path.name}.corrupt-{stamp}")
        if saved.exists():
            raise JournalError(f"backup {str(saved)!r} exists already; name another with --backup")
        atomic_write_bytes(saved, data)
        atomic_write_bytes(path, b"".join(data[a:b] for a, b in frames))
        return found, saved
    finally:
        os.close(lock_fd)
