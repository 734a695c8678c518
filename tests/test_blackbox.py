"""The black-box teacher against a live ``kdl serve-teacher`` on 127.0.0.1: answers, auth, limits, budget, faults.

The server runs as a subprocess (``kdl serve-teacher``'s module; hard answers, token required); clients that are
killed run in forked processes (no server thread in this process then). Soft answers come from the same app run by
uvicorn in a thread, started and stopped inside their test.
Paid answers are counted from the server's own log (one JSON line per answered request, with image hashes).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from kd_lightning.serve.service import read_server_log
from kd_lightning.teachers import (
    BlackBoxTeacher,
    HTTPTeacher,
    LocalTeacher,
    QueryBudgetExceeded,
    QueryJournal,
    TeacherAPIError,
)
from kd_lightning.teachers.blackbox import encode_array, image_hashes, to_wire
from kd_lightning.teachers.frozen import FrozenTeacher
from tests.blackbox_helpers import digits8_teacher, fault_proxy, serve_in_thread, serve_teacher  # noqa: F401

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(digits8_teacher: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """A real ``kdl serve-teacher`` process answering hard labels, token required; yields (url, its log)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve_teacher(digits8_teacher, log, "hard", token=TOKEN) as url:
        yield url, log


def hard(url: str, **kw) -> HTTPTeacher:
    return HTTPTeacher(url, token=TOKEN, responses="hard", **kw)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def charged(log: Path) -> Counter:
    """How many times the server charged each image hash (from its own log)."""
    c: Counter = Counter()
    if log.exists():
        for rec in read_server_log(log):
            if rec["charged"]:
                c.update(rec["hashes"])
    return c


# ---------------------------------------------------------------------------- answers and the HTTP surface
def test_soft_and_hard_answers_have_the_right_shapes_types_and_values(
    server: tuple,
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    x = images(12)
    with serve_in_thread(digits8_teacher, tmp_path / "soft.log", "soft") as soft_url:
        soft = HTTPTeacher(soft_url, responses="soft")
        p = soft.query(x)
        soft.close()
    hard_client = hard(server[0])
    y = hard_client.query(x)
    assert isinstance(soft, BlackBoxTeacher) and isinstance(hard_client, BlackBoxTeacher)
    assert p.shape == (12, 10) and p.dtype == torch.float32
    assert y.shape == (12,) and y.dtype == torch.int64
    torch.testing.assert_close(p.sum(-1), torch.ones(12))
    # independently: the checkpoint's own net on the same 8-bit pixels
    t = FrozenTeacher.from_checkpoint(digits8_teacher)
    expect = torch.softmax(t(soft.prepare(x)), -1)
    torch.testing.assert_close(p, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(y, expect.argmax(-1))
    # the in-process teacher answers the same
    local = LocalTeacher(digits8_teacher, responses="soft")
    torch.testing.assert_close(local.query(x), p)
    # bytes: 12 uint8 8x8 images up (plus the .npy header), 12 x 10 float32 down
    assert soft.stats.bytes_up == len(encode_array(to_wire(x, "uint8"))) and soft.stats.bytes_up > 12 * 64
    assert soft.stats.bytes_down == len(encode_array(np.zeros((12, 10), np.float32)))
    assert hard_client.stats.bytes_down == len(encode_array(np.zeros(12, np.int64)))
    hard_client.close()


def test_health_auth_limits_and_malformed_input(server: tuple) -> None:
    url = server[0]
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.json()["num_classes"] == 10 and h.json()["responses"] == "hard"
    body = encode_array(np.zeros((2, 1, 8, 8), np.uint8))
    npy = {"Content-Type": "application/x-npy"}
    auth = {**npy, "Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{url}/query", content=body, headers=npy).status_code == 401
    assert httpx.post(f"{url}/query", content=body, headers={**npy, "Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{url}/query", content=body, headers=auth).status_code == 200
    with pytest.raises(TeacherAPIError, match="401"):
        HTTPTeacher(url, token="", responses="hard").query(images(2))

    def post(content: bytes, **headers: str) -> httpx.Response:
        return httpx.post(f"{url}/query", content=content, headers={**auth, **headers})

    too_many = post(encode_array(np.zeros((65, 1, 8, 8), np.uint8)))
    assert too_many.status_code == 413 and "64" in too_many.json()["detail"]
    assert post(b"not an array").status_code == 400
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert post(buf.getvalue()).status_code == 400  # pickles are refused
    assert post(encode_array(np.zeros((2, 3, 8, 8), np.uint8))).status_code == 422  # channels
    assert post(encode_array(np.zeros((2, 1, 9, 9), np.uint8))).status_code == 422  # size
    assert post(encode_array(np.full((2, 1, 8, 8), np.nan, np.float32))).status_code == 422
    assert post(encode_array(np.full((2, 1, 8, 8), 2.0, np.float32))).status_code == 422
    assert post(encode_array(np.zeros((2, 1, 8, 8), np.int32))).status_code == 422
    assert post(body, **{"Content-Type": "application/json"}).status_code == 415
    # a client stops at once on such a 4xx, with the server's message
    client = hard(url, wire_dtype="float32")
    client.sleep = lambda s: pytest.fail("a 4xx must not be retried")
    with pytest.raises(TeacherAPIError, match="channels"):
        client.query(torch.rand(2, 3, 8, 8))


def test_request_id_replays_without_charging_and_refuses_other_images(server: tuple) -> None:
    url, log = server
    body = encode_array(to_wire(images(3, seed=5), "uint8"))
    other = encode_array(to_wire(images(3, seed=6), "uint8"))
    headers = {
        "Content-Type": "application/x-npy",
        "X-Request-Id": "rid-replay-test",
        "Authorization": f"Bearer {TOKEN}",
    }
    first = httpx.post(f"{url}/query", content=body, headers=headers)
    again = httpx.post(f"{url}/query", content=body, headers=headers)
    assert first.headers["x-replayed"] == "false" and again.headers["x-replayed"] == "true"
    assert first.content == again.content
    assert httpx.post(f"{url}/query", content=other, headers=headers).status_code == 409
    recs = [r for r in read_server_log(log) if r["request_id"] == "rid-replay-test"]
    assert [r["charged"] for r in recs] == [True, False]


# ---------------------------------------------------------------------------- budget
def test_budget_is_checked_before_sending(server: tuple, tmp_path: Path) -> None:
    url, log = server
    before = sum(charged(log).values())
    client = hard(url, query_budget=10, journal=tmp_path / "j.bin")
    client.query(images(8, seed=11))
    with pytest.raises(QueryBudgetExceeded, match="query_budget=10"):
        client.query(images(3, seed=12))  # 8 + 3 > 10: nothing sent
    assert sum(charged(log).values()) - before == 8
    client.query(images(8, seed=11))  # asked again: from the journal, free
    assert client.stats.images_paid == 8 and client.stats.images_from_journal == 8


def _spend(url: str, journal: str, budget: int, seed: int) -> None:
    client = hard(url, query_budget=budget, journal=journal)
    for i in range(100):
        try:
            client.query(images(7, seed=1000 * seed + i))
        except QueryBudgetExceeded:
            break
    client.close()
    os._exit(0)


def test_budget_never_exceeded_by_four_concurrent_clients(server: tuple, tmp_path: Path) -> None:
    url, log = server
    before = charged(log)
    journal, budget = str(tmp_path / "shared.bin"), 100
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_spend, args=(url, journal, budget, s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    new = charged(log) - before
    assert sum(new.values()) <= budget
    assert sum(new.values()) > budget - 7 * 4  # they did spend it (each stops only when 7 more would not fit)
    j = QueryJournal(journal, hard(url).fingerprint())
    assert j.spent == sum(new.values()) and not j.pending
    # threads sharing one client obey it too
    client = hard(url, query_budget=30, journal=tmp_path / "threads.bin")
    errors: list[Exception] = []

    def spend(seed: int) -> None:
        for i in range(10):
            try:
                client.query(images(4, seed=50_000 + 100 * seed + i))
            except QueryBudgetExceeded as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=spend, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.spent <= 30 and len(errors) == 4


# ---------------------------------------------------------------------------- crashes
SEQUENCE = [(i, 6) for i in range(60)]  # 60 batches of 6 distinct images


def _run_sequence(url: str, journal: str) -> None:
    client = hard(url, journal=journal, max_batch=6)
    for seed, n in SEQUENCE:
        client.query(images(n, seed=70_000 + seed))
    client.close()
    os._exit(0)


def test_killed_runs_resume_without_losing_or_double_paying(server: tuple, tmp_path: Path) -> None:
    url, log = server
    before = charged(log)
    journal = str(tmp_path / "crash.bin")
    ctx = mp.get_context("fork")
    rng = random.Random(0)
    for _ in range(10):  # 10 runs, each SIGKILLed at a random point
        p = ctx.Process(target=_run_sequence, args=(url, journal))
        p.start()
        p.join(rng.uniform(0.02, 0.4))
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join()
    last = ctx.Process(target=_run_sequence, args=(url, journal))  # then one run to the end
    last.start()
    last.join(120)
    assert last.exitcode == 0
    paid = charged(log) - before
    wanted = {h.hex() for seed, n in SEQUENCE for h in image_hashes(to_wire(images(n, seed=70_000 + seed), "uint8"))}
    assert set(paid) == wanted  # every image paid for ...
    assert max(paid.values()) == 1  # ... exactly once
    j = QueryJournal(journal, hard(url).fingerprint())
    assert {h.hex() for h in j.answers} == wanted and not j.pending  # and no paid answer lost
    assert j.spent == len(wanted)


def test_torn_journal_tail_is_cut_and_a_foreign_journal_refused(tmp_path: Path, digits8_teacher: Path) -> None:  # noqa: F811
    path = tmp_path / "j.bin"
    client = LocalTeacher(digits8_teacher, responses="hard", journal=path)
    client.query(images(5))
    client.close()
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"KDLJA\x00\x10")  # a crash in the middle of an append
    j = QueryJournal(path, client.fingerprint())
    assert len(j.answers) == 5 and path.stat().st_size == good
    from kd_lightning.teachers import blackbox

    with pytest.raises(blackbox.JournalError, match="written for"):
        QueryJournal(path, "another teacher")


# ---------------------------------------------------------------------------- faults
def test_injected_faults_are_survived_without_paying_twice(server: tuple, tmp_path: Path) -> None:
    url, log = server
    before = charged(log)
    plan = ["503", "429", "timeout", "drop_before", "drop_after", "ok", "503", "drop_after"]
    with fault_proxy(url, plan, retry_after=0.3, hold=1.5) as proxy:
        client = hard(proxy.url, timeout=0.5, journal=tmp_path / "f.bin", max_retries=10)
        client.num_classes = 10  # skip /health so that every fault lands on /query
        waits: list[float] = []
        client.sleep = waits.append
        x1, x2 = images(6, seed=900), images(6, seed=901)
        y1, y2 = client.query(x1), client.query(x2)
    paid = charged(log) - before
    assert sum(paid.values()) == 12 and max(paid.values()) == 1  # drop_after's answers were replayed, not re-charged
    direct = hard(url)
    assert torch.equal(y1, direct.query(x1)) and torch.equal(y2, direct.query(x2))
    assert proxy.applied[: len(plan)] == plan
    # query 1: 503, 429, timeout, drop_before, drop_after (charged, answer lost), ok (a replay); query 2: 503,
    # drop_after, ok (a replay)
    assert client.stats.retries == 7 and client.stats.requests == 9 and client.stats.replays == 2
    assert client.stats.images_paid == 12
    assert waits[1] >= 0.3  # the 429's Retry-After was honoured


def test_a_teacher_that_stays_down_fails_clearly_and_keeps_the_intent(server: tuple, tmp_path: Path) -> None:
    url, log = server
    before = charged(log)
    with fault_proxy(url, ["503"] * 3) as proxy:
        client = hard(proxy.url, journal=tmp_path / "d.bin", max_retries=2)
        client.num_classes, client.sleep = 10, lambda s: None
        with pytest.raises(TeacherAPIError, match="after 2 retries"):
            client.query(images(4, seed=31))
        client.close()
    resumed = hard(url, journal=tmp_path / "d.bin")
    assert resumed.settle_pending() == 1 and resumed.spent == 4
    resumed.query(images(4, seed=31))
    assert resumed.stats.images_paid == 0 and resumed.stats.images_from_journal == 4
    paid = charged(log) - before
    assert sum(paid.values()) == 4 and max(paid.values()) == 1  # sent once, when the run resumed


def test_kdl_dispatches_serve_teacher_and_refuses_a_missing_checkpoint(tmp_path: Path, capsys) -> None:
    from kd_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve-teacher", "--help"])
    assert e.value.code == 0 and "--responses" in capsys.readouterr().out
    assert main(["serve-teacher", "--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_health_says_the_image_size_and_how_images_reach_it(tmp_path: Path) -> None:
    """A Fashion-MNIST teacher was trained on 28x28 images zero-padded to 32x32: /health tells a client so."""
    from kd_lightning.checkpoints import CONFIG_KEY
    from kd_lightning.serve.service import TeacherService
    from tests.helpers import write_teacher

    path = write_teacher(tmp_path / "t.ckpt", 10, image_size=32)
    ckpt = torch.load(path, weights_only=False)
    ckpt[CONFIG_KEY] = {"model": {}, "data": {"class_path": "kd_lightning.data.FashionMNISTDataModule"}}
    torch.save(ckpt, path)
    info = TeacherService.from_checkpoint(path).info()
    assert info["image_size"] == 32 and "uint8 0..255 or float in [0, 1]" in info["input"]
    assert info["preprocess"] == (
        "FashionMNISTDataModule images are 28x28: pad them with zeros to 32x32 (2 pixels left/top, 2 right/bottom), "
        "as in training"
    )


# ---------------------------------------------------------------------------- module layout and public API
def test_open_and_refresh_stats_report_what_earlier_runs_paid(tmp_path: Path, digits8_teacher: Path) -> None:  # noqa: F811
    path = tmp_path / "j.bin"
    first = LocalTeacher(digits8_teacher, responses="hard", journal=path)
    first.query(images(4))
    first.close()
    again = LocalTeacher(digits8_teacher, responses="hard", journal=path)
    assert again.spent == 0  # the journal is opened lazily ...
    again.open()
    assert again.spent == 4  # ... or on demand, before any query
    stats = again.refresh_stats()
    assert stats is again.stats and stats.journal_spent == 4 and stats.images_paid == 0
    assert stats.journal_bytes_up > 0 and stats.journal_bytes_down > 0
    again.close()


def _kd_imports(path: Path) -> set[str]:
    """Every ``kd_lightning`` module a source file imports, at module level or inside functions."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kd_lightning"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kd_lightning"))
    return found


def test_the_server_takes_the_wire_format_from_wire_and_never_from_the_client() -> None:
    """serve/ <-> teachers.blackbox was an import cycle; both ends now take the protocol from teachers/wire.py."""
    import kd_lightning.serve.server as server
    import kd_lightning.serve.service as service
    import kd_lightning.teachers.wire as wire

    client_side = {"kd_lightning.teachers", "kd_lightning.teachers.blackbox", "kd_lightning.teachers.client"}
    for module in (service, server):
        imports = _kd_imports(Path(module.__file__))
        assert "kd_lightning.teachers.wire" in imports and not imports & client_side, (module.__name__, imports)
    assert _kd_imports(Path(wire.__file__)) == set()  # the bottom of the stack
    assert server.TOKEN_ENV == wire.TOKEN_ENV and server.CONTENT_TYPES[0] == wire.NPY_CONTENT_TYPE


def test_old_import_paths_keep_working() -> None:
    from kd_lightning.methods import blackbox_baselines, mekd
    from kd_lightning.teachers import blackbox, client, frozen_generator, journal, wire

    for name in ("QueryClient", "QueryStats", "QueryBudgetExceeded", "TeacherAPIError"):
        assert getattr(blackbox, name) is getattr(client, name)
    for name in ("QueryJournal", "JournalError", "JournalCheck", "check_journal", "repair_journal", "scan_frames"):
        assert getattr(blackbox, name) is getattr(journal, name)
    for name in ("Responses", "WireDType", "NPY_CONTENT_TYPE", "encode_array", "decode_array", "image_hashes"):
        assert getattr(blackbox, name) is getattr(wire, name)
    assert mekd.FrozenGenerator is frozen_generator.FrozenGenerator
    assert mekd.load_frozen_generator is frozen_generator.load_frozen_generator
    assert mekd.BlackBoxKD is blackbox_baselines.BlackBoxKD
    for name in ("MEKD", "BlackBoxKD", "BlackBoxStudent", "MEKDDeprivatization", "answer_logits", "im_queries"):
        assert hasattr(mekd, name)
    for name in ("KN", "AL", "DAFL", "AM", "DB3KD", "LogitDiscriminator", "random_crop"):
        assert hasattr(blackbox_baselines, name)
