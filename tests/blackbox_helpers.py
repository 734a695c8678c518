"""Test helpers for the black-box teacher: a live ``kdl serve-teacher`` process and a fault-injecting TCP proxy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_teacher(ckpt: Path, log: Path, responses: str = "soft", token: str | None = None, max_batch: int = 64):
    """``kdl serve-teacher`` in a subprocess on a free loopback port; yields its URL, stops it afterwards."""
    port = free_port()
    # the module kdl serve-teacher runs, without importing the Trainer CLI (test_cli covers the dispatch)
    cmd = [sys.executable, "-m", "kd_lightning.serve.server", "--ckpt", str(ckpt), "--responses", responses]
    cmd += ["--port", str(port), "--max-batch", str(max_batch), "--log", str(log)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("KDL_TEACHER_TOKEN", None)
    if token:
        env["KDL_TEACHER_TOKEN"] = token  # the env route; --token is tested through the CLI parser
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"kdl serve-teacher exited with {proc.returncode}: {out[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


class FaultProxy:
    """A loopback TCP proxy that applies one fault per HTTP request, in the order of ``plan``.

    Faults: ``"503"`` and ``"429"`` (answered by the proxy, 429 with ``Retry-After: <retry_after>``),
    ``"drop_before"`` (close without forwarding), ``"drop_after"`` (forward, let the server answer and charge,
    then close without relaying the answer), ``"timeout"`` (hold the connection past the client's timeout),
    ``"ok"`` (forward and relay). After the plan, every request is forwarded.
    """

    def __init__(self, upstream: str, plan: list[str], retry_after: float = 0.2, hold: float = 2.0) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.plan = list(plan)
        self.applied: list[str] = []
        self.retry_after, self.hold = retry_after, hold
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_message(conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None, buf
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None, buf
            rest += chunk
        return head + b"\r\n\r\n" + rest[:length], rest[length:]

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                request, buf = self._read_message(conn, buf)
                if request is None:
                    return
                with self._lock:
                    fault = self.plan.pop(0) if self.plan else "ok"
                    self.applied.append(fault)
                if fault in ("503", "429"):
                    status = "503 Service Unavailable" if fault == "503" else "429 Too Many Requests"
                    extra = f"Retry-After: {self.retry_after}\r\n" if fault == "429" else ""
                    body = b'{"detail":"injected"}'
                    conn.sendall(
                        f"HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )
                    return
                if fault == "drop_before":
                    return
                if fault == "timeout":
                    time.sleep(self.hold)
                    return
                with socket.create_connection(self.upstream) as up:
                    up.sendall(request)
                    response, _ = self._read_message(up, b"")
                if fault == "drop_after" or response is None:
                    return
                conn.sendall(response)
        except OSError:
            return
        finally:
            conn.close()


@contextmanager
def fault_proxy(upstream: str, plan: list[str], **kw) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, plan, **kw)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def digits8_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tinynet teacher on the cloud part of scikit-learn's digits (8 px; its checkpoint says so)."""
    import lightning as L

    from kd_lightning.data import DigitsEdgeCloud
    from tests.helpers import digits_classifier, fit_and_save

    L.seed_everything(0)
    model, _ = digits_classifier(image_size=8)
    dm = DigitsEdgeCloud(part="cloud", batch_size=64, augment=False)
    return fit_and_save(model, dm, tmp_path_factory.mktemp("teacher") / "teacher.ckpt", max_epochs=3)


@contextmanager
def serve_in_thread(ckpt: Path, log: Path, responses: str = "soft", token: str | None = None):
    """The same FastAPI app as ``kdl serve-teacher``, run by uvicorn in a thread of this process (a live loopback
    server without a second interpreter's start-up); yields its URL."""
    import uvicorn

    from kd_lightning.serve.server import create_app
    from kd_lightning.serve.service import TeacherService

    service = TeacherService.from_checkpoint(ckpt, responses=responses, log_path=log)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service, token), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
