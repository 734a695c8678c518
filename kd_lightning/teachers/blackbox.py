"""Black-box teachers: a model behind an API that answers images with probabilities or class ids, and nothing else.

The protocol (:class:`BlackBoxTeacher`) is ``query(images) -> answers``: images in [0, 1] (N x C x H x W)
go out, and either soft answers (``N x num_classes`` float32 probabilities) or hard answers (``N``
int64 class ids) come back. No logits, no gradients, no weights.

Two implementations share one client core (:class:`QueryClient`):

- :class:`LocalTeacher` answers in-process from a ``kdl`` checkpoint (through
  :class:`~kd_lightning.teachers.FrozenTeacher` and the same :class:`~kd_lightning.serve.service.TeacherService`
  the HTTP server runs), for tests and single-machine runs;
- :class:`HTTPTeacher` talks to ``kdl serve-teacher`` over HTTP (httpx), retrying 429/5xx/timeouts/dropped
  connections with exponential backoff and jitter (tenacity), honouring ``Retry-After``.

What the client core guarantees:

- **Budget.** Every image sent counts against ``query_budget``; the check happens before sending, under a
  lock (a thread lock and, with a journal, an ``fcntl`` file lock), so the budget is never exceeded, also by
  concurrent threads or processes sharing one journal.
- **Journal.** Each request is first journalled as an *intent* (request id, image hashes and the request body),
  then sent with the request id as an idempotency key, then its *answer* is journalled. Records are CRC-framed
  and appended with one ``write`` + ``fsync``; a torn tail (a crash mid-write) is cut off on the next open. A run
  that restarts re-sends its pending intents with the same request id (the server replays them without charging)
  and takes every journalled answer from the journal: nothing paid is lost, nothing is paid twice. Answers are
  keyed by the SHA-256 of the image's wire bytes, so an image asked again (a later epoch) costs nothing.
- **Accounting.** Bytes up and down (request and response bodies, every attempt) and counts of images paid,
  served from the journal, requests and retries are kept in :attr:`QueryClient.stats` (paper Table 6).

Images travel as ``.npy`` arrays (binary, self-describing), by default quantised to uint8 as an image API
would take them (``wire_dtype``); :meth:`QueryClient.prepare` gives the images exactly as the teacher saw them,
so a student can be trained on the same pixels.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from kd_lightning.errors import ConfigError, KDLError

if TYPE_CHECKING:
    from tenacity import RetryCallState

Responses = Literal["soft", "hard"]
WireDType = Literal["uint8", "float16", "float32"]
NPY_CONTENT_TYPE = "application/x-npy"


class QueryBudgetExceeded(KDLError):
    """Sending the next images would exceed the query budget."""


class TeacherAPIError(KDLError):
    """The teacher's server refused a request (a 4xx other than 429) or stayed unreachable after retries."""


class JournalError(KDLError):
    """The query journal is corrupt (not just a torn tail) or belongs to another teacher."""


@runtime_checkable
class BlackBoxTeacher(Protocol):
    """A teacher seen only through its answers."""

    responses: Responses
    num_classes: int

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> ``N x num_classes`` probabilities (soft) or ``N`` class ids (hard)."""
        ...


# ---------------------------------------------------------------------------- wire format
def encode_array(array: np.ndarray) -> bytes:
    """A numpy array as ``.npy`` bytes (no pickling)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> array; :class:`ValueError` on anything else (pickles included)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several kinds on malformed input
        raise ValueError(f"not a .npy array ({type(e).__name__}: {e})") from None


def to_wire(images: torch.Tensor, wire_dtype: WireDType) -> np.ndarray:
    """Images in [0, 1] as the array that is sent (uint8 = round(255 x), or float16/float32)."""
    x = images.detach().float().cpu().clamp(0, 1)
    if wire_dtype == "uint8":
        return (x * 255).round().to(torch.uint8).numpy()
    return x.numpy().astype(wire_dtype)


def from_wire(array: np.ndarray) -> torch.Tensor:
    """The wire array back to float32 images in [0, 1] (what the teacher sees)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


def image_hashes(wire: np.ndarray) -> list[bytes]:
    """SHA-256 of every image's wire bytes (dtype and shape included, so equal bytes mean equal images)."""
    tag = f"{wire.dtype.str}{wire.shape[1:]}".encode()
    return [hashlib.sha256(tag + np.ascontiguousarray(row).tobytes()).digest() for row in wire]


# ---------------------------------------------------------------------------- journal
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


# ---------------------------------------------------------------------------- the client core
@dataclass
class QueryStats:
    """What this client exchanged with the teacher (this process; ``journal_*`` include earlier runs).

    ``images_paid`` counts images sent for the first time (reserved against the budget); ``replays`` counts
    requests the server answered from its idempotency record (a retry of a request it had already charged).
    """

    images_paid: int = 0
    images_from_journal: int = 0
    replays: int = 0
    requests: int = 0
    retries: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    journal_spent: int = 0
    journal_bytes_up: int = 0
    journal_bytes_down: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Reply:
    """One server reply: status, headers and body (the transport's own objects stay inside the transport)."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, {k.lower(): v for k, v in (headers or {}).items()}


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueryClient:
    """Budget, journal, hashing and accounting shared by every black-box teacher (subclasses implement ``_post``).

    Args:
        responses: ``"soft"`` (probabilities) or ``"hard"`` (class ids).
        num_classes: the teacher's classes (checked against every answer).
        query_budget: most images this client may ever send (journalled earlier runs included); ``None``: no limit.
        journal: path of the query journal; ``None`` keeps answers in memory only (nothing survives a crash).
        wire_dtype: how images travel: ``"uint8"`` (an image API's 8 bits, default), ``"float16"`` or ``"float32"``.
        max_batch: most images per request (larger queries are split).
        max_retries: retries of one request on 429, 5xx, timeouts and dropped connections.
        backoff_initial: first backoff in seconds (doubling, with up to ``backoff_jitter`` seconds of jitter).
        backoff_max: longest single wait in seconds (a longer ``Retry-After`` is honoured anyway).
        backoff_jitter: maximum random jitter added to each backoff, seconds.
    """

    source = "teacher"

    def __init__(
        self,
        responses: Responses = "soft",
        num_classes: int | None = None,
        query_budget: int | None = None,
        journal: str | os.PathLike | None = None,
        wire_dtype: WireDType = "uint8",
        max_batch: int = 256,
        max_retries: int = 8,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        backoff_jitter: float = 0.05,
    ) -> None:
        if responses not in ("soft", "hard"):
            raise ConfigError(f"responses={responses!r}; expected 'soft' or 'hard'")
        if wire_dtype not in ("uint8", "float16", "float32"):
            raise ConfigError(f"wire_dtype={wire_dtype!r}; expected 'uint8', 'float16' or 'float32'")
        if query_budget is not None and query_budget < 0:
            raise ConfigError(f"query_budget={query_budget}; expected a number >= 0 or null")
        if max_batch < 1 or max_retries < 0:
            raise ConfigError(f"max_batch={max_batch}, max_retries={max_retries}; expected >= 1 and >= 0")
        self.responses: Responses = responses
        self.num_classes = int(num_classes or 0)
        self.query_budget = query_budget
        self.wire_dtype: WireDType = wire_dtype
        self.max_batch = max_batch
        self.max_retries = max_retries
        self.backoff = (backoff_initial, backoff_max, backoff_jitter)
        self.stats = QueryStats()
        self._thread_lock = threading.RLock()
        self._journal_path = journal
        self._journal: QueryJournal | None = None
        self._memory: dict[bytes, np.ndarray] = {}
        self._memory_spent = 0
        self._settled = False
        self.sleep = time.sleep  # how backoff waits (tests record it)

    # ------------------------------------------------------------------ subclass hooks
    def _post(self, request_id: str, body: bytes) -> _Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.source} ({self.responses})"

    # ------------------------------------------------------------------ public API
    @property
    def spent(self) -> int:
        """Images sent so far against the budget (journalled earlier runs included)."""
        return self._journal.spent if self._journal is not None else self._memory_spent

    @property
    def remaining(self) -> int | None:
        return None if self.query_budget is None else max(0, self.query_budget - self.spent)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The images exactly as the teacher sees them (after the wire's quantisation), float32 in [0, 1]."""
        return from_wire(to_wire(images, self.wire_dtype)).to(images.device)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Answers for ``images`` (N x C x H x W in [0, 1]): soft ``N x num_classes`` float32, hard ``N`` int64.

        Images answered before (same wire bytes; this run or a journalled earlier one) are not sent again.
        Raises :class:`QueryBudgetExceeded` before sending anything that would go over ``query_budget``.
        """
        if images.ndim != 4:
            raise ConfigError(f"query expects N x C x H x W images; got shape {tuple(images.shape)}")
        wire = to_wire(images, self.wire_dtype)
        hashes = image_hashes(wire)
        self._ensure_open()
        if not self._settled:
            self.settle_pending()
        todo: dict[bytes, int] = {}
        chunks: list[tuple[bytes, list[bytes], bytes]] = []
        with self._locked():
            known = self._known()
            for i, h in enumerate(hashes):
                if h not in known and h not in todo:
                    todo[h] = i
            self.stats.images_from_journal += len(hashes) - sum(1 for h in hashes if h in todo)
            if todo:
                need = len(todo)
                if self.query_budget is not None and self.spent + need > self.query_budget:
                    raise QueryBudgetExceeded(
                        f"{self.describe()}: sending {need} more images would exceed query_budget="
                        f"{self.query_budget} ({self.spent} already sent); raise the budget or use fewer queries"
                    )
                order = list(todo.items())
                for s in range(0, len(order), self.max_batch):
                    part = order[s : s + self.max_batch]
                    rid = uuid.uuid4().bytes
                    body = encode_array(wire[[i for _, i in part]])
                    self._reserve(rid, [h for h, _ in part], body)
                    chunks.append((rid, [h for h, _ in part], body))
        for rid, hs, body in chunks:
            self._send_and_record(rid, hs, body)
        with self._locked():
            known = self._known()
            answers = np.stack([known[h] for h in hashes])
        self._sync_journal_stats()
        return torch.from_numpy(answers).to(images.device)

    def settle_pending(self) -> int:
        """Re-send the journal's unanswered intents (same request ids: free replays); returns how many."""
        self._ensure_open()
        self._settled = True
        if self._journal is None:
            return 0
        with self._locked():
            pending = list(self._journal.pending.values())
        for intent in pending:
            self._send_and_record(intent.rid, intent.hashes, intent.body)
        self._sync_journal_stats()
        return len(pending)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # ------------------------------------------------------------------ internals
    def fingerprint(self) -> str:
        """What a journal must agree on: the answer type and the wire format (not the address, which may move)."""
        return f"{self.responses}|{self.wire_dtype}"

    def _ensure_open(self) -> None:
        if self._journal is None and self._journal_path is not None:
            self._journal = QueryJournal(self._journal_path, self.fingerprint())
            self._sync_journal_stats()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._journal is None:
                yield
                return
            with self._journal.locked():
                self._journal.refresh()
                yield

    def _known(self) -> dict[bytes, np.ndarray]:
        return self._journal.answers if self._journal is not None else self._memory

    def _reserve(self, rid: bytes, hashes: list[bytes], body: bytes) -> None:
        self.stats.images_paid += len(hashes)
        if self._journal is not None:
            self._journal.add_intent(rid, hashes, body)
        else:
            self._memory_spent += len(hashes)

    def _send_and_record(self, rid: bytes, hashes: list[bytes], body: bytes) -> None:
        up0, down0 = self.stats.bytes_up, self.stats.bytes_down
        reply = self._post_with_retries(uuid.UUID(bytes=rid).hex, body)
        answers = self._check_answers(reply.body, len(hashes))
        with self._locked():
            if reply.headers.get("x-replayed", "false") == "true":
                self.stats.replays += 1
            if self._journal is not None:
                up, down = self.stats.bytes_up - up0, self.stats.bytes_down - down0
                self._journal.add_answer(rid, hashes, answers, up, down)
            else:
                self._memory.update(zip(hashes, answers))

    def _check_answers(self, body: bytes, n: int) -> np.ndarray:
        try:
            answers = decode_array(body)
        except ValueError as e:
            raise TeacherAPIError(f"{self.describe()} sent an unreadable answer: {e}") from None
        if self.responses == "soft":
            ok = answers.ndim == 2 and answers.shape[0] == n and answers.dtype == np.float32
            if ok and self.num_classes and answers.shape[1] != self.num_classes:
                ok = False
        else:
            ok = answers.shape == (n,) and answers.dtype == np.int64
        if not ok:
            want = f"({n}, {self.num_classes or 'C'}) float32" if self.responses == "soft" else f"({n},) int64"
            raise TeacherAPIError(
                f"{self.describe()} answered {answers.dtype} {answers.shape}; expected {self.responses} answers {want}"
            )
        if self.responses == "soft" and not self.num_classes:
            self.num_classes = int(answers.shape[1])
        return answers

    def _post_with_retries(self, request_id: str, body: bytes) -> _Reply:
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

        initial, longest, jitter = self.backoff
        backoff = wait_exponential_jitter(multiplier=initial, max=longest, jitter=jitter)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None
            base = backoff(state)
            after = getattr(exc, "retry_after", None)
            return max(base, after) if after is not None else base

        def count_retry(state: RetryCallState) -> None:
            self.stats.retries += 1

        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            wait=wait,
            stop=stop_after_attempt(self.max_retries + 1),
            before_sleep=count_retry,
            sleep=lambda seconds: self.sleep(seconds),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.stats.requests += 1
                    self.stats.bytes_up += len(body)
                    reply = self._post(request_id, body)
                    self.stats.bytes_down += len(reply.body)
                    if reply.status == 200:
                        return reply
                    message = _server_message(reply)
                    if reply.status == 429 or reply.status >= 500:
                        raise _Retryable(f"HTTP {reply.status}: {message}", _retry_after(reply))
                    raise TeacherAPIError(f"{self.describe()} refused the request: HTTP {reply.status}: {message}")
        except _Retryable as e:
            raise TeacherAPIError(
                f"{self.describe()} still failing after {self.max_retries} retries ({e}); the request is journalled "
                "and will be re-sent (without paying twice) when the run resumes"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _sync_journal_stats(self) -> None:
        j = self._journal
        if j is not None:
            self.stats.journal_spent, self.stats.journal_bytes_up, self.stats.journal_bytes_down = (
                j.spent,
                j.bytes_up,
                j.bytes_down,
            )
        else:
            self.stats.journal_spent = self._memory_spent
            self.stats.journal_bytes_up, self.stats.journal_bytes_down = self.stats.bytes_up, self.stats.bytes_down


def _server_message(reply: _Reply) -> str:
    import json

    try:
        detail = json.loads(reply.body.decode() or "{}").get("detail")
    except (ValueError, UnicodeDecodeError, AttributeError):
        detail = None
    return str(detail) if detail else reply.body[:200].decode(errors="replace") or "(no message)"


def _retry_after(reply: _Reply) -> float | None:
    value = reply.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


# ---------------------------------------------------------------------------- implementations
class LocalTeacher(QueryClient):
    """A ``kdl`` classifier checkpoint answering in-process, with the server's validation and the client's accounting.

    Args:
        ckpt: the teacher's ``kdl`` checkpoint.
        **kwargs: see :class:`QueryClient` (``num_classes`` is read from the checkpoint).
    """

    def __init__(self, ckpt: str | os.PathLike, **kwargs: Any) -> None:
        from kd_lightning.serve.service import TeacherService

        responses = kwargs.pop("responses", "soft")
        self.service = TeacherService.from_checkpoint(ckpt, responses=responses, max_batch=10**9)
        kwargs.setdefault("num_classes", self.service.num_classes)
        self.source = f"local:{os.path.abspath(ckpt)}"
        super().__init__(responses=responses, **kwargs)

    def _post(self, request_id: str, body: bytes) -> _Reply:
        status, out, headers = self.service.handle(body, request_id)
        return _Reply(status, out, headers)


class HTTPTeacher(QueryClient):
    """A teacher served by ``kdl serve-teacher`` (or any server speaking its protocol), over HTTP with httpx.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8765``.
        token: bearer token; ``None`` reads ``KDL_TEACHER_TOKEN`` (no header when both are unset).
        timeout: seconds for connecting and for reading one answer.
        **kwargs: see :class:`QueryClient` (``num_classes`` is read from ``GET /health`` when not given).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, **kwargs: Any) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher url={url!r}; expected http://HOST:PORT or https://...")
        self.url = url.rstrip("/")
        self.source = f"http:{self.url}"
        token = token if token is not None else os.environ.get("KDL_TEACHER_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        super().__init__(**kwargs)

    def health(self) -> dict[str, Any]:
        """``GET /health`` (200 with the model's facts when it is loaded)."""
        import httpx

        try:
            r = self._http.get("/health")
        except httpx.HTTPError as e:
            raise TeacherAPIError(f"teacher at {self.url} is unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise TeacherAPIError(f"teacher at {self.url}: GET /health gave HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    def _ensure_open(self) -> None:
        if not self.num_classes:
            info = self.health()
            if info.get("responses") != self.responses:
                raise ConfigError(
                    f"teacher at {self.url} serves {info.get('responses')!r} answers but responses="
                    f"{self.responses!r} was asked for"
                )
            self.num_classes = int(info["num_classes"])
        super()._ensure_open()

    def _post(self, request_id: str, body: bytes) -> _Reply:
        import httpx

        try:
            r = self._http.post(
                "/query", content=body, headers={"Content-Type": NPY_CONTENT_TYPE, "X-Request-Id": request_id}
            )
        except (httpx.TimeoutException, httpx.TransportError) as e:  # timeouts, resets, dropped connections
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        return _Reply(r.status_code, r.content, dict(r.headers))

    def close(self) -> None:
        super().close()
        self._http.close()


def connect_teacher(spec: str | os.PathLike | QueryClient, **kwargs: Any) -> QueryClient:
    """A black-box teacher: :class:`HTTPTeacher` for an http(s) URL, :class:`LocalTeacher` for a checkpoint."""
    if isinstance(spec, QueryClient):
        return spec
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        return HTTPTeacher(spec, **kwargs)
    kwargs.pop("token", None)
    kwargs.pop("timeout", None)
    if not os.path.isfile(spec):
        raise ConfigError(f"teacher={spec!r} is neither an http(s) URL nor an existing checkpoint file")
    return LocalTeacher(spec, **kwargs)


__all__ = [
    "NPY_CONTENT_TYPE",
    "BlackBoxTeacher",
    "HTTPTeacher",
    "JournalCheck",
    "JournalError",
    "LocalTeacher",
    "QueryBudgetExceeded",
    "QueryClient",
    "QueryJournal",
    "QueryStats",
    "TeacherAPIError",
    "check_journal",
    "connect_teacher",
    "decode_array",
    "encode_array",
    "from_wire",
    "image_hashes",
    "repair_journal",
    "to_wire",
]
