"""The client core of every black-box teacher: budget, dedup, journal, retries and accounting (no transport).

What it guarantees:

- **Budget.** Every image sent counts against ``query_budget``; the check happens before sending, under a
  lock (a thread lock and, with a journal, an ``fcntl`` file lock), so the budget is never exceeded, also by
  concurrent threads or processes sharing one journal.
- **Journal.** Every paid request is journalled before it is sent and its answer after
  (:class:`~kd_lightning.teachers.journal.QueryJournal`): a restarted run re-sends its pending requests with the
  same request id (free replays) and takes every journalled answer from the journal. Answers are keyed by the
  SHA-256 of the image's wire bytes, so an image asked again (a later epoch) costs nothing.
- **Retries.** 429, 5xx, timeouts and dropped connections are retried with exponential backoff and jitter
  (tenacity), honouring ``Retry-After``.
- **Accounting.** Bytes up and down (request and response bodies, every attempt) and counts of images paid,
  served from the journal, requests and retries are kept in :attr:`QueryClient.stats` (paper Table 6).

A transport subclasses :class:`QueryClient` and implements ``_post`` (:mod:`kd_lightning.teachers.blackbox`:
in-process and HTTP).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.teachers.journal import QueryJournal
from kd_lightning.teachers.wire import (
    REPLAYED_HEADER,
    RESPONSES,
    WIRE_DTYPES,
    Responses,
    WireDType,
    decode_array,
    encode_array,
    from_wire,
    image_hashes,
    to_wire,
)

if TYPE_CHECKING:
    from tenacity import RetryCallState


class QueryBudgetExceeded(KDLError):
    """Sending the next images would exceed the query budget."""


class TeacherAPIError(KDLError):
    """The teacher's server refused a request (a 4xx other than 429) or stayed unreachable after retries."""


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


class Reply:
    """One server reply: status, headers and body (the transport's own objects stay inside the transport)."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, {k.lower(): v for k, v in (headers or {}).items()}


class RetryableError(Exception):
    """A failure worth retrying (429, 5xx, a timeout, a dropped connection), with the server's ``Retry-After``."""

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
        if responses not in RESPONSES:
            raise ConfigError(f"responses={responses!r}; expected 'soft' or 'hard'")
        if wire_dtype not in WIRE_DTYPES:
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
    def _post(self, request_id: str, body: bytes) -> Reply:  # pragma: no cover - abstract
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
        self.open()
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
        self.refresh_stats()
        return torch.from_numpy(answers).to(images.device)

    def settle_pending(self) -> int:
        """Re-send the journal's unanswered intents (same request ids: free replays); returns how many."""
        self.open()
        self._settled = True
        if self._journal is None:
            return 0
        with self._locked():
            pending = list(self._journal.pending.values())
        for intent in pending:
            self._send_and_record(intent.rid, intent.hashes, intent.body)
        self.refresh_stats()
        return len(pending)

    def open(self) -> None:
        """Get ready to query: open the journal (reading what earlier runs paid), and learn the teacher's facts.

        Idempotent. :meth:`query` calls it; a caller calls it early to fail early (a foreign journal, a server
        that is down or answers another kind) and to read :attr:`spent` before the first query.
        """
        if self._journal is None and self._journal_path is not None:
            self._journal = QueryJournal(self._journal_path, self.fingerprint())
            self.refresh_stats()

    def refresh_stats(self) -> QueryStats:
        """:attr:`stats` with its ``journal_*`` counts brought up to date (a shared journal grows meanwhile)."""
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
        return self.stats

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # ------------------------------------------------------------------ internals
    def fingerprint(self) -> str:
        """What a journal must agree on: the answer type and the wire format (not the address, which may move)."""
        return f"{self.responses}|{self.wire_dtype}"

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
            if reply.headers.get(REPLAYED_HEADER.lower(), "false") == "true":
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

    def _post_with_retries(self, request_id: str, body: bytes) -> Reply:
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
            retry=retry_if_exception_type(RetryableError),
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
                        raise RetryableError(f"HTTP {reply.status}: {message}", _retry_after(reply))
                    raise TeacherAPIError(f"{self.describe()} refused the request: HTTP {reply.status}: {message}")
        except RetryableError as e:
            raise TeacherAPIError(
                f"{self.describe()} still failing after {self.max_retries} retries ({e}); the request is journalled "
                "and will be re-sent (without paying twice) when the run resumes"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover


def _server_message(reply: Reply) -> str:
    import json

    try:
        detail = json.loads(reply.body.decode() or "{}").get("detail")
    except (ValueError, UnicodeDecodeError, AttributeError):
        detail = None
    return str(detail) if detail else reply.body[:200].decode(errors="replace") or "(no message)"


def _retry_after(reply: Reply) -> float | None:
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
