r"""``kdl serve-teacher``: serve a classifier checkpoint as a black-box teacher (FastAPI + uvicorn).

    kdl serve-teacher --ckpt runs/mekd/fashion_mnist/teacher/checkpoints/best.ckpt --responses soft \
        [--host 127.0.0.1] [--port 8765] [--token SECRET | env KDL_TEACHER_TOKEN] [--max-batch 1024] [--log FILE]
        [--replay-db FILE] [--max-body-mb 256] [--insecure-no-token]

Endpoints:

- ``GET /health``: 200 and ``{"status": "ok", "responses", "num_classes", "in_channels", "image_size",
  "max_batch", "dtypes"}`` once the model is loaded (no token needed).
- ``POST /query``: body = a ``.npy`` array of images (``Content-Type: application/x-npy``), N x C x H x W,
  uint8 (0..255) or float16/float32 in [0, 1]; optional ``X-Request-Id`` (idempotency key: a retry with the same
  id is replayed, not charged). Answer: ``.npy`` float32 ``N x classes`` probabilities (soft) or int64 ``N`` class
  ids (hard), headers ``X-Charged`` and ``X-Replayed``. Errors: 401 without the bearer token (when one is set),
  413 above ``--max-batch`` images or ``--max-body-mb`` (counted as the body streams in, chunked or not), 415 for
  another content type, 400/422 for a body that is not a .npy image batch of the teacher's shape, range and byte
  order, 409 for a reused request id with other images.

A non-loopback ``--host`` needs a token (or ``--insecure-no-token``). Answered request ids persist beside the log
(:class:`~kd_lightning.serve.service.ReplayRecord`), so a restarted server replays instead of charging again.

Why FastAPI + uvicorn rather than LitServe: the protocol is a raw binary body with our own status codes
(401/409/413/415/422), an idempotency header and a health answer with the model's facts. FastAPI gives these
directly; LitServe (built on FastAPI) is made for dynamic batching on accelerators behind its own ``/predict``
route and worker processes, which this CPU teacher does not need and which would hide the request/response
details the accounting depends on.
"""

# no "from __future__ import annotations": FastAPI reads the endpoint annotations at definition time
import argparse
import ipaddress
import os
import secrets
import sys
from typing import TYPE_CHECKING, Any

from kd_lightning.errors import KDLError
from kd_lightning.flags import parse_bool
from kd_lightning.teachers.wire import (
    CONTENT_TYPES,
    HEALTH_PATH,
    NPY_CONTENT_TYPE,
    QUERY_PATH,
    REQUEST_ID_HEADER,
    TOKEN_ENV,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kd_lightning.serve.service import TeacherService


def create_app(
    service: "TeacherService", token: str | None = None, max_body_bytes: int = 256 * 2**20, max_concurrent: int = 8
) -> "FastAPI":
    """The FastAPI app around a :class:`~kd_lightning.serve.service.TeacherService`.

    At most ``max_concurrent`` queries are read or answered at once; more get 503 with ``Retry-After`` (the client
    retries them), so the bodies held in memory stay under ``max_concurrent * max_body_bytes``.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="kd_lightning black-box teacher", docs_url=None, redoc_url=None, openapi_url=None)
    in_flight = [0]  # queries being read or answered (one event loop: no lock needed)

    def refused(status: int, detail: str, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    @app.get(HEALTH_PATH)
    def health() -> dict[str, Any]:
        return service.info()

    @app.post(QUERY_PATH)
    async def query(request: Request) -> Response:
        if token is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return refused(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in CONTENT_TYPES:
            return refused(415, f"Content-Type {ctype or '(none)'!r}; expected {NPY_CONTENT_TYPE}")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return refused(413, f"body of {length} bytes; the limit is {max_body_bytes}")
        if in_flight[0] >= max_concurrent:
            return refused(
                503, f"{in_flight[0]} queries in flight; the limit is {max_concurrent}", **{"Retry-After": "1"}
            )
        in_flight[0] += 1
        try:
            return await answer(request)
        finally:
            in_flight[0] -= 1

    async def answer(request: Request) -> Response:
        # counted while it streams in (a chunked body has no Content-Length): at most the limit plus one chunk is
        # held before the 413; uvicorn then closes the connection without reading the rest
        received = bytearray()
        try:
            async for chunk in request.stream():
                received += chunk
                if len(received) > max_body_bytes:
                    return refused(413, f"body above the limit of {max_body_bytes} bytes", Connection="close")
        except ClientDisconnect:
            return refused(400, "the client disconnected before the body was complete")
        body = bytes(received)
        del received
        status, out, headers = await run_in_threadpool(service.handle, body, request.headers.get(REQUEST_ID_HEADER))
        media = headers.pop("Content-Type", NPY_CONTENT_TYPE)
        return Response(out, status_code=status, media_type=media, headers=headers)

    return app


def build_parser() -> argparse.ArgumentParser:
    """Build ``kdl serve-teacher``'s argument parser."""
    p = argparse.ArgumentParser(prog="kdl serve-teacher", description="Serve a classifier checkpoint as a black box.")
    p.add_argument("--ckpt", required=True, help="the teacher's kdl checkpoint")
    p.add_argument("--responses", choices=("soft", "hard"), default="soft", help="probabilities or class ids")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=_port, default=8765, help="TCP port, 0..65535 (0: any free port)")
    p.add_argument("--token", default=None, help=f"bearer token required on /query (default: ${TOKEN_ENV}, or none)")
    # options spelt as every kdl option is (kd_lightning.flags); the dash spellings stay as aliases
    p.add_argument(
        "--insecure_no_token",
        "--insecure-no-token",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="serve on a non-loopback --host without a token (anyone who reaches it can query the teacher)",
    )
    p.add_argument("--max_batch", "--max-batch", type=int, default=1024, help="most images per request (more: 413)")
    p.add_argument("--max_body_mb", "--max-body-mb", type=float, default=256.0,
                   help="largest request body in MiB (more: 413)")  # fmt: skip
    p.add_argument("--max_concurrent", "--max-concurrent", type=int, default=8,
                   help="most queries read or answered at once (more: 503, which clients retry); memory for "
                        "bodies stays under max_concurrent x max_body_mb")  # fmt: skip
    p.add_argument("--log", default=None, help="JSON-lines log of every answered request (what was charged)")
    p.add_argument(
        "--replay_db",
        "--replay-db",
        default=None,
        help="SQLite file of answered request ids, kept across restarts so that retries are replayed, not charged "
        "(default: beside --log as <log>.replays.sqlite; in memory without --log)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for inference")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kdl serve-teacher``; returns the exit status."""
    args = build_parser().parse_args(argv)
    import torch
    import uvicorn

    from kd_lightning.serve.service import TeacherService

    torch.set_num_threads(max(1, args.threads))
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if args.max_batch < 1:
        print(f"kdl serve-teacher: --max-batch {args.max_batch}; expected a positive integer", file=sys.stderr)
        return 2
    if args.max_concurrent < 1:
        print(
            f"kdl serve-teacher: --max-concurrent {args.max_concurrent}; expected a positive integer", file=sys.stderr
        )
        return 2
    if not args.max_body_mb > 0:
        size = f"{args.max_body_mb:g}"
        print(f"kdl serve-teacher: --max-body-mb {size}; expected a positive size in MiB", file=sys.stderr)
        return 2
    if token is not None and not token.strip():
        # an unset shell variable (--token "$TOKEN") would otherwise serve with a blank secret
        print(
            "kdl serve-teacher: error: --token is empty; expected a secret (or no --token for a loopback --host)",
            file=sys.stderr,
        )
        return 2
    if not _is_loopback(args.host) and token is None:
        if not args.insecure_no_token:
            print(
                f"kdl serve-teacher: error: --host {args.host} is reachable from other machines and no token is set; "
                f"pass --token (or set {TOKEN_ENV}), or --insecure-no-token to serve without one",
                file=sys.stderr,
            )
            return 2
        print(f"kdl serve-teacher: warning: serving on {args.host} without a token", file=sys.stderr)
    try:
        service = TeacherService.from_checkpoint(
            args.ckpt, responses=args.responses, max_batch=args.max_batch, log_path=args.log, replay_path=args.replay_db
        )
    except (KDLError, ValueError) as e:
        print(f"kdl serve-teacher: error: {e}", file=sys.stderr)
        return 2
    app = create_app(service, token, int(args.max_body_mb * 2**20), args.max_concurrent)
    print(
        f"kdl serve-teacher: {service.teacher.describe()} answering {args.responses} on "
        f"http://{args.host}:{args.port} (token {'required' if token else 'not required'})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; expected an integer in 0..65535")
    return port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
