"""``kdl journal check|repair``: what a journal file holds and where it is damaged; keeping its readable records.

Nothing here opens the journal as a client does (no append, no cut): :func:`check_journal` only reads, and
:func:`repair_journal` writes a new file of the readable records after a backup, holding the writers' lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from kd_lightning.teachers.journal_format import (
    HEAD,
    MAGIC,
    JournalError,
    JournalRecords,
    is_torn_tail,
    salvage,
)


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


def check_journal(path: str | os.PathLike) -> JournalCheck:
    """Read a journal without writing anything and say what is readable and what is damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JournalError(f"cannot read query journal {str(path)!r}: {e.strerror}") from None
    if not data.startswith(MAGIC):
        raise JournalError(f"{str(path)!r} is not a query journal (it does not start with a journal record)")
    frames, damaged = salvage(data)
    probe = _JournalReplay(path, None)
    for start, end in frames:
        probe.apply(data[start + 4 : start + 5], data[start + HEAD.size : end])
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


class _JournalReplay(JournalRecords):
    """A journal's records applied in memory (no file), for :func:`check_journal`."""

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
        frames, _damaged = salvage(data)
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
