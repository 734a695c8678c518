"""``kdl serve-teacher``'s defences: body limits while streaming, no open server without a token, bad ports and
byte orders refused with a 4xx or exit 2, and request ids that survive a restart (no replay charged twice).

The body-limit tests drive the ASGI app directly with a ``receive`` that counts what the app pulled, so "stopped
reading at the limit" is a count, not a timing or a memory reading; one more goes through a real uvicorn socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from kd_lightning.serve import server as serve_main
from kd_lightning.serve.server import create_app
from kd_lightning.serve.service import TeacherService, default_replay_path, read_server_log
from kd_lightning.teachers import HTTPTeacher, QueryJournal, TeacherAPIError
from kd_lightning.teachers.blackbox import encode_array
from tests.blackbox_helpers import (  # noqa: F401
    REPO,
    digits8_teacher,
    fault_proxy,
    free_port,
    serve_in_thread,
    wait_healthy,
)

CHUNK = 64 * 1024


class _Echo:
    """A stand-in service: the body limit is checked before any teacher is asked."""

    def __init__(self) -> None:
        self.bodies: list[int] = []

    def info(self) -> dict[str, Any]:
        return {"status": "ok"}

    def handle(self, body: bytes, request_id: str | None) -> tuple[int, bytes, dict[str, str]]:
        self.bodies.append(len(body))
        return 200, b"", {}


async def _upload(app: Any, n_chunks: int, content_length: int | None = None) -> tuple[int, int]:
    """POST ``n_chunks`` chunks of :data:`CHUNK` bytes to ``/query``; ``(status, bytes the app pulled)``."""
    pulled = 0
    sent_chunks = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled, sent_chunks
        if sent_chunks == n_chunks:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent_chunks += 1
        pulled += CHUNK
        await asyncio.sleep(0)  # let the other uploads run in between, as a server's event loop would
        return {"type": "http.request", "body": b"\0" * CHUNK, "more_body": True}

    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    headers = [(b"content-type", b"application/x-npy")]
    headers += [(b"content-length", str(content_length).encode())] if content_length else []
    headers += [] if content_length else [(b"transfer-encoding", b"chunked")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/query",
        "raw_path": b"/query",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    await app(scope, receive, send)
    return status[0], pulled


def test_a_chunked_body_is_cut_at_the_limit_also_with_eight_uploads_at_once() -> None:
    limit = 4 * CHUNK + 100
    service = _Echo()
    app = create_app(service, None, max_body_bytes=limit)  # type: ignore[arg-type]

    async def many() -> list[tuple[int, int]]:
        # 8 uploads of 64 MiB each, without Content-Length (a server reading them whole would hold 512 MiB)
        return await asyncio.gather(*(_upload(app, 1024) for _ in range(8)))

    for status, pulled in asyncio.run(many()):
        assert status == 413
        assert pulled <= limit + CHUNK  # stopped within one chunk of the limit, not after the whole body
    assert service.bodies == []
    # within the limit, chunked or with a Content-Length, the body reaches the service whole
    assert asyncio.run(_upload(app, 4)) == (200, 4 * CHUNK)
    assert asyncio.run(_upload(app, 4, content_length=4 * CHUNK)) == (200, 4 * CHUNK)
    assert service.bodies == [4 * CHUNK, 4 * CHUNK]
    # a declared Content-Length above the limit is refused before a byte is read
    assert asyncio.run(_upload(app, 1024, content_length=1024 * CHUNK)) == (413, 0)


def test_queries_beyond_max_concurrent_get_503_with_retry_after_and_the_slots_free_again() -> None:
    """Memory for bodies is bounded by max_concurrent x max_body: the third of three uploads that stream at once
    is refused before a byte is read, and once they are answered a new query gets in."""
    service = _Echo()
    app = create_app(service, None, max_body_bytes=8 * CHUNK, max_concurrent=2)  # type: ignore[arg-type]

    async def three() -> list[tuple[int, int]]:
        return await asyncio.gather(*(_upload(app, 4) for _ in range(3)))

    assert sorted(asyncio.run(three())) == [(200, 4 * CHUNK), (200, 4 * CHUNK), (503, 0)]
    assert service.bodies == [4 * CHUNK, 4 * CHUNK]
    assert asyncio.run(_upload(app, 4)) == (200, 4 * CHUNK)  # the slots were given back


def test_a_chunked_upload_over_a_socket_gets_413() -> None:
    import uvicorn

    app = create_app(_Echo(), None, max_body_bytes=10_000)  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60)
        head = (
            b"POST /query HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunks = b"".join(b"3e8\r\n" + b"\0" * 1000 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"  # 20 kB, no length
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head + chunks)
            reply = b""
            while data := s.recv(65536):
                reply += data
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"above the limit of 10000 bytes" in reply
    finally:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------- the command line
def test_a_public_host_without_a_token_is_refused_unless_insecure_is_said(
    digits8_teacher: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    started: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append(host))
    monkeypatch.delenv("KDL_TEACHER_TOKEN", raising=False)
    ckpt = ["--ckpt", str(digits8_teacher)]
    for host in ("0.0.0.0", "192.168.1.7", "::"):
        assert serve_main.main([*ckpt, "--host", host]) == 2
        err = capsys.readouterr().err
        assert f"--host {host} is reachable from other machines and no token is set" in err, err
        assert "--insecure-no-token" in err and "Traceback" not in err
    assert started == []
    assert serve_main.main([*ckpt, "--host", "0.0.0.0", "--insecure-no-token"]) == 0
    assert "warning: serving on 0.0.0.0 without a token" in capsys.readouterr().err
    assert serve_main.main([*ckpt, "--host", "0.0.0.0", "--token", "t0ken"]) == 0
    assert serve_main.main([*ckpt, "--host", "127.0.0.1"]) == 0  # loopback: no token needed
    assert serve_main.main([*ckpt, "--host", "localhost"]) == 0
    assert started == ["0.0.0.0", "0.0.0.0", "127.0.0.1", "localhost"]
    # a blank --token (an unset shell variable: --token "$TOKEN") is no secret: refused, on any host
    capsys.readouterr()
    for host in ("0.0.0.0", "127.0.0.1"):
        assert serve_main.main([*ckpt, "--host", host, "--token", ""]) == 2
        err = capsys.readouterr().err
        assert "--token is empty; expected a secret" in err and "Traceback" not in err
    assert started == ["0.0.0.0", "0.0.0.0", "127.0.0.1", "localhost"]


def test_max_concurrent_below_one_exits_2_naming_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main.main(["--ckpt", "t.ckpt", "--max-concurrent", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-concurrent 0; expected a positive integer" in err and "Traceback" not in err
    for size in ("0", "-1"):  # every body would be a 413
        assert serve_main.main(["--ckpt", "t.ckpt", "--max-body-mb", size]) == 2
        assert f"--max-body-mb {size}; expected a positive size in MiB" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_exits_2_with_one_message(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kd_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve-teacher", "--ckpt", "t.ckpt", "--port", port])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"argument --port: {port!r} is not a TCP port; expected an integer in 0..65535" in err, err
    assert "Traceback" not in err


def test_a_big_endian_batch_is_a_4xx_that_the_client_does_not_retry(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    service = TeacherService.from_checkpoint(digits8_teacher, responses="hard")
    body = encode_array(np.zeros((2, 1, 8, 8), ">f4"))
    status, out, _ = service.handle(body)
    assert status == 422
    assert "byte order '>f4'" in json.loads(out)["detail"] and "'<f4'" in json.loads(out)["detail"]
    assert service.handle(encode_array(np.zeros((2, 1, 8, 8), "<f4")))[0] == 200

    class BigEndianClient(HTTPTeacher):
        def _post(self, request_id: str, body: bytes):  # what a client on a big-endian host would send
            return super()._post(request_id, encode_array(np.zeros((2, 1, 8, 8), ">f4")))

    with serve_in_thread(digits8_teacher, tmp_path / "s.jsonl", "hard") as url:
        reply = httpx.post(f"{url}/query", content=body, headers={"Content-Type": "application/x-npy"})
        assert reply.status_code == 422 and "byte order" in reply.json()["detail"]
        client = BigEndianClient(url, responses="hard")
        client.sleep = lambda s: pytest.fail("a 4xx must not be retried")
        with pytest.raises(TeacherAPIError, match=r"HTTP 422.*byte order"):
            client.query(torch.rand(2, 1, 8, 8))
        assert client.stats.retries == 0
        client.close()


# ---------------------------------------------------------------------------- restarts
@contextmanager
def _server(ckpt: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    cmd = [sys.executable, "-m", "kd_lightning.serve.server", "--ckpt", str(ckpt), "--responses", "hard"]
    cmd += ["--port", str(port), "--log", str(log)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("KDL_TEACHER_TOKEN", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_restarted_server_replays_what_it_charged_before_it_died(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    log, journal = tmp_path / "server.jsonl", tmp_path / "client.journal"
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with _server(digits8_teacher, log) as (url, proc):
        # the server charges and answers; the answer never reaches the client, which dies before journalling it
        with fault_proxy(url, ["drop_after"]) as proxy:
            client = HTTPTeacher(proxy.url, responses="hard", journal=journal, max_retries=0)
            client.num_classes = 10  # no /health through the proxy
            client.sleep = lambda s: None
            with pytest.raises(TeacherAPIError):
                client.query(x)
            client.close()
        os.kill(proc.pid, signal.SIGKILL)  # and the server dies too
        proc.wait()
    assert default_replay_path(log).is_file()
    with _server(digits8_teacher, log) as (url, _):  # both restart; the client resumes its pending request
        resumed = HTTPTeacher(url, responses="hard", journal=journal)
        y = resumed.query(x)
        assert resumed.stats.replays == 1 and resumed.stats.images_paid == 0
        resumed.close()
    records = read_server_log(log)
    charged = sum(r["n"] for r in records if r["charged"])
    journalled = QueryJournal(journal, resumed.fingerprint())
    assert charged == len(journalled.answers) == journalled.spent == 8
    assert [r["charged"] for r in records] == [True, False]  # the second answer was a replay
    assert y.shape == (8,)


def test_a_request_id_older_than_the_answer_window_is_replayed_free_after_a_restart(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The boundary of the replay record: a client retries its pending request after the server answered more
    requests than it keeps answers for (other clients, other stages) and restarted; it is still not charged twice."""
    from kd_lightning.teachers.wire import CHARGED_HEADER, REPLAYED_HEADER, decode_array

    def service() -> TeacherService:
        return TeacherService.from_checkpoint(
            digits8_teacher, responses="soft", replay_path=tmp_path / "r.sqlite", idempotency_window=2
        )

    rng = np.random.default_rng(0)
    bodies = [encode_array(rng.integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)) for _ in range(5)]
    first = service()
    status, paid, headers = first.handle(bodies[0], "pending")  # charged; the client dies before journalling it
    assert status == 200 and headers[CHARGED_HEADER] == "3"
    for i in (1, 2, 3):  # three more requests: "pending" leaves the window of 2 kept answers
        assert first.handle(bodies[i], f"other-{i}")[2][CHARGED_HEADER] == "3"
    first._done.close()
    again = service()  # the server restarted
    status, out, headers = again.handle(bodies[0], "pending")
    assert status == 200 and headers[REPLAYED_HEADER] == "true" and headers[CHARGED_HEADER] == "0"
    np.testing.assert_array_equal(decode_array(out), decode_array(paid))  # the teacher's answer, asked again
    assert again.handle(bodies[4], "pending")[0] == 409  # still bound to its images
    assert again.handle(bodies[3], "other-3")[2][CHARGED_HEADER] == "0"  # a kept answer replays as before
    assert again.images_charged == 0
    assert len(again._done) == 4 and again._done.answers_kept() == 2  # every id, the last two answers
    again._done.close()
    # a smaller window on a later start drops the answers beyond it at once
    smaller = TeacherService.from_checkpoint(
        digits8_teacher, responses="soft", replay_path=tmp_path / "r.sqlite", idempotency_window=1
    )
    assert len(smaller._done) == 4 and smaller._done.answers_kept() == 1
    smaller._done.close()
