"""The query journal's bytes and what its records mean, with no file, lock or process in sight.

A journal is a run of CRC-framed records: a header record (``H``: the fingerprint, i.e. answer type and wire
format, the journal was written for), then *intents* (``I``: request id, image hashes, the request body) and
*answers* (``A``: request id, image hashes, bytes up and down, the answers). :class:`JournalRecords` applies
records in memory (answers by image hash, pending intents, images paid, bytes exchanged); the functions below
find records in raw bytes and tell a torn tail (a crash mid-append) from damage. :mod:`.journal` keeps the live
file (locks, appends, refresh) and :mod:`.journal_repair` is ``kdl journal check|repair``; both build on this.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lightning.errors import KDLError
from kd_lightning.teachers.wire import decode_array


class JournalError(KDLError):
    """The query journal is corrupt (not just a torn tail) or belongs to another teacher."""


MAGIC = b"KDLJ"
HEAD = struct.Struct("<4scII")  # magic, kind, payload length, crc32 of the payload
INTENT, ANSWER = b"I", b"A"
KINDS = (b"H", INTENT, ANSWER)


@dataclass
class Intent:
    """A journalled request not answered yet: re-sent with the same id (a free replay) by a restarted run."""

    rid: bytes
    hashes: list[bytes]
    body: bytes


class JournalRecords:
    """A journal's records applied in memory: answers by image hash, pending intents, images paid, bytes.

    Args:
        path: the journal's file (named in errors).
        fingerprint: what the journal must have been written for; ``None`` accepts any.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str | None) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.written_for: str | None = None  # the fingerprint in the file's header record
        self.answers: dict[bytes, np.ndarray] = {}
        self.pending: dict[bytes, Intent] = {}
        self._intents: set[bytes] = set()
        self._answered: set[bytes] = set()
        self.spent = 0  # images in every intent (paid or in flight), and in answers whose intent is lost
        self.bytes_up = 0
        self.bytes_down = 0

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
        if kind == INTENT:
            if rid not in self._intents:
                self._intents.add(rid)
                self.spent += n
            if rid not in self._answered:
                self.pending[rid] = Intent(rid, hashes, rest)
        elif kind == ANSWER:
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


def pack_frame(kind: bytes, payload: bytes) -> bytes:
    """One record: magic, kind, payload length and the payload's CRC-32, then the payload."""
    return HEAD.pack(MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def frame_at(data: bytes, pos: int) -> int | None:
    """The end of the valid record starting at ``pos`` (magic, known kind, whole, CRC right), else ``None``."""
    if len(data) - pos < HEAD.size:
        return None
    magic, kind, n, crc = HEAD.unpack_from(data, pos)
    end = pos + HEAD.size + n
    if magic != MAGIC or kind not in KINDS or end > len(data) or zlib.crc32(data[pos + HEAD.size : end]) != crc:
        return None
    return end


def scan_frames(data: bytes) -> tuple[list[tuple[bytes, int, int]], int | None]:
    """The valid records from the start of ``data`` (kind, payload start, end), and where the first bad one starts."""
    out: list[tuple[bytes, int, int]] = []
    pos = 0
    while pos < len(data):
        end = frame_at(data, pos)
        if end is None:
            return out, pos
        out.append((data[pos + 4 : pos + 5], pos + HEAD.size, end))
        pos = end
    return out, None


def next_frame(data: bytes, pos: int) -> int | None:
    """The start of the first valid record after ``pos`` (found by its magic), else ``None``."""
    at = data.find(MAGIC, pos + 1)
    while at >= 0:
        if frame_at(data, at) is not None:
            return at
        at = data.find(MAGIC, at + 1)
    return None


def is_torn_tail(data: bytes, bad: int) -> bool:
    """Whether the damage at ``bad`` is a torn tail: no valid record after it, and not a whole record gone bad.

    A crash mid-append leaves a last record shorter than its header says (or a header cut short, or a block of
    zeros); a record whose header is whole and whose length ends exactly at the end of the file is complete,
    so a CRC that fails there is a changed byte, not a torn write.
    """
    if next_frame(data, bad) is not None:
        return False
    if len(data) - bad >= HEAD.size:
        _magic, kind, n, _crc = HEAD.unpack_from(data, bad)
        if kind in KINDS and bad + HEAD.size + n == len(data):
            return False
    return True


def salvage(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every valid record of ``data`` as (start, end) frame ranges, skipping damage; and the damaged ranges."""
    frames: list[tuple[int, int]] = []
    damaged: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data):
        end = frame_at(data, pos)
        if end is not None:
            frames.append((pos, end))
            pos = end
            continue
        nxt = next_frame(data, pos)
        stop = len(data) if nxt is None else nxt
        damaged.append((pos, stop))
        pos = stop
    return frames, damaged
