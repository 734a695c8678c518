"""The query journal: an append-only, CRC-framed binary record of every paid request, its replay and repair.

Each request is first journalled as an *intent* (request id, image hashes and the request body), then sent with
the request id as an idempotency key, then its *answer* is journalled. Records are CRC-framed and appended with
one ``write`` + ``fsync``; a torn tail (a crash mid-write) is cut off on the next open. A run that restarts
re-sends its pending intents with the same request id (the server replays them without charging) and takes every
journalled answer from the journal: nothing paid is lost, nothing is paid twice.

This module is the live file: :class:`QueryJournal` (locks, appends, reading what other holders appended).
The record format and what records mean are in :mod:`.journal_format`; :func:`check_journal` and
:func:`repair_journal` (``kdl journal check|repair``) in :mod:`.journal_repair`. Every name of the journal is
importable from here, as before the split.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from typing import Literal

import numpy as np

from kd_lightning.errors import ConfigError
from kd_lightning.teachers.journal_format import (
    ANSWER,
    INTENT,
    Intent,
    JournalError,
    JournalRecords,
    is_torn_tail,
    pack_frame,
    scan_frames,
)
from kd_lightning.teachers.journal_repair import JournalCheck, check_journal, repair_journal
from kd_lightning.teachers.wire import encode_array

__all__ = [
    "Intent",
    "JournalCheck",
    "JournalError",
    "JournalRecords",
    "QueryJournal",
    "check_journal",
    "is_torn_tail",
    "repair_journal",
    "scan_frames",
]


class QueryJournal(JournalRecords):
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
        super().__init__(path, fingerprint)
        self.mode = mode
        self.records = 0
        self.torn_tail = 0  # bytes of an incomplete last record (cut in append mode, skipped in read mode)
        self._offset = 0
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

    # ------------------------------------------------------------------ writing (lock held)
    def _append(self, kind: bytes, payload: bytes) -> None:
        if self.mode != "append":
            raise JournalError(f"query journal {str(self.path)!r} was opened for reading only")
        frame = pack_frame(kind, payload)
        written = os.write(self._fd, frame)
        if written != len(frame):  # pragma: no cover - a full disk
            raise JournalError(f"short write to {str(self.path)!r} ({written} of {len(frame)} bytes)")
        os.fsync(self._fd)
        self._offset += len(frame)

    def add_intent(self, rid: bytes, hashes: list[bytes], body: bytes) -> None:
        payload = rid + struct.pack("<I", len(hashes)) + b"".join(hashes) + body
        self._append(INTENT, payload)
        self._apply(INTENT, payload)
        self.records += 1

    def add_answer(self, rid: bytes, hashes: list[bytes], answers: np.ndarray, up: int, down: int) -> None:
        payload = (
            rid
            + struct.pack("<I", len(hashes))
            + b"".join(hashes)
            + struct.pack("<QQ", up, down)
            + encode_array(answers)
        )
        self._append(ANSWER, payload)
        self._apply(ANSWER, payload)
        self.records += 1
