"""Black-box teachers: a model behind an API that answers images with probabilities or class ids, and nothing else.

The protocol (:class:`~kd_lightning.teachers.wire.BlackBoxTeacher`) is ``query(images) -> answers``: images in
[0, 1] (N x C x H x W) go out, and either soft answers (``N x num_classes`` float32 probabilities) or hard answers
(``N`` int64 class ids) come back. No logits, no gradients, no weights.

Two implementations share one client core (:class:`~kd_lightning.teachers.client.QueryClient`: budget, journal,
dedup, retries, accounting):

- :class:`LocalTeacher` answers in-process from a ``kdl`` checkpoint (through
  :class:`~kd_lightning.teachers.FrozenTeacher` and the same :class:`~kd_lightning.serve.service.TeacherService`
  the HTTP server runs), for tests and single-machine runs;
- :class:`HTTPTeacher` talks to ``kdl serve-teacher`` over HTTP (httpx).

The pieces live apart: the wire format and protocol constants in :mod:`~kd_lightning.teachers.wire` (shared with
the server), the binary journal in :mod:`~kd_lightning.teachers.journal`, the client core in
:mod:`~kd_lightning.teachers.client`. Their public names stay importable from here as well.
"""

from __future__ import annotations

import os
from typing import Any

from kd_lightning.errors import ConfigError
from kd_lightning.teachers.client import (
    QueryBudgetExceeded,
    QueryClient,
    QueryStats,
    Reply,
    RetryableError,
    TeacherAPIError,
)
from kd_lightning.teachers.journal import (
    JournalCheck,
    JournalError,
    QueryJournal,
    check_journal,
    is_torn_tail,
    repair_journal,
    scan_frames,
)
from kd_lightning.teachers.wire import (
    HEALTH_PATH,
    NPY_CONTENT_TYPE,
    QUERY_PATH,
    REQUEST_ID_HEADER,
    TOKEN_ENV,
    BlackBoxTeacher,
    Responses,
    WireDType,
    decode_array,
    encode_array,
    from_wire,
    image_hashes,
    to_wire,
)


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

    def _post(self, request_id: str, body: bytes) -> Reply:
        status, out, headers = self.service.handle(body, request_id)
        return Reply(status, out, headers)


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
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        super().__init__(**kwargs)

    def health(self) -> dict[str, Any]:
        """``GET /health`` (200 with the model's facts when it is loaded)."""
        import httpx

        try:
            r = self._http.get(HEALTH_PATH)
        except httpx.HTTPError as e:
            raise TeacherAPIError(f"teacher at {self.url} is unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise TeacherAPIError(f"teacher at {self.url}: GET /health gave HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    def open(self) -> None:
        if not self.num_classes:
            info = self.health()
            if info.get("responses") != self.responses:
                raise ConfigError(
                    f"teacher at {self.url} serves {info.get('responses')!r} answers but responses="
                    f"{self.responses!r} was asked for"
                )
            self.num_classes = int(info["num_classes"])
        super().open()

    def _post(self, request_id: str, body: bytes) -> Reply:
        import httpx

        try:
            r = self._http.post(
                QUERY_PATH, content=body, headers={"Content-Type": NPY_CONTENT_TYPE, REQUEST_ID_HEADER: request_id}
            )
        except (httpx.TimeoutException, httpx.TransportError) as e:  # timeouts, resets, dropped connections
            raise RetryableError(f"{type(e).__name__}: {e}") from None
        return Reply(r.status_code, r.content, dict(r.headers))

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
    "Responses",
    "TeacherAPIError",
    "WireDType",
    "check_journal",
    "connect_teacher",
    "decode_array",
    "encode_array",
    "from_wire",
    "image_hashes",
    "is_torn_tail",
    "repair_journal",
    "scan_frames",
    "to_wire",
]
