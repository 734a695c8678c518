"""A stand-in for ``kdl`` that starts in a fraction of a second, for the pipeline's own tests.

    KDL_PIPELINE_LAUNCHER="python tests/fake_kdl.py" kdl pipeline --config ...

It reads ``--config`` files and ``--key value`` overrides the way kdl does (later wins) and appends one
JSON line per invocation to ``$FAKE_KDL_JOURNAL`` (command, run folder, resumed epoch), so a test sees
exactly which stages ran and how. Recipe keys under ``fake`` steer it:

- ``fit``: one "epoch" per ``trainer.max_epochs`` (default 1), each rewriting
  ``<default_root_dir>/checkpoints/last.ckpt`` (JSON with the epoch); ``--ckpt_path last``
  continues after the saved epoch. ``best.ckpt`` is written at the end; its bytes depend on the config
  and on the bytes of every existing file the config names, so a changed input changes the output.
  Each epoch also adds a row (``val/acc1`` 0.5, 0.6, ...) to ``lightning_logs/version_N/metrics.csv``, rewrites
  the progress file ``$KDL_PROGRESS_FILE`` names, and the fit ends with a ``plots/curves.png`` (not a real PNG).
- ``test``/``validate``/``predict``: prints a metric; ``test`` writes it (``test/acc1`` 0.5) into a new
  ``lightning_logs/version_N/metrics.csv``.
- ``serve-teacher``: becomes ``python -m http.server --port <port>`` on 127.0.0.1.
- any other command writes ``fake.out`` (a folder with one file) the same way as ``best.ckpt``; with
  ``fake.refuse_other`` it refuses a folder written with other settings, as ``kdl generate`` does.
- ``fake.fetch: URL`` first GETs the URL and prints its status (a stage that uses a background server).
- ``fake.fail: N`` exits with status N after printing a message.
- For stages side by side (``--jobs``), in this order: ``fake.needs: PATH`` exits 6 unless PATH exists at start;
  ``fake.touch: PATH`` writes an empty PATH; ``fake.wait_for: PATH`` waits until PATH exists (exits 5 after
  ``fake.wait_s`` seconds, default 60: a stage that waits for one that never runs beside it fails, never hangs);
  ``fake.then_touch: PATH`` writes an empty PATH once the wait is over.

``$FAKE_KDL_SLEEP`` (seconds per epoch) slows ``fit`` down without changing the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import yaml


def merged_config(argv: list[str]) -> tuple[dict, str | None]:
    cfg: dict = {}
    ckpt_path = None
    i = 0
    while i < len(argv):
        key, value = argv[i].lstrip("-"), argv[i + 1] if i + 1 < len(argv) else "true"
        i += 2
        if key == "config":
            with open(value) as f:
                cfg = merge(cfg, yaml.safe_load(f) or {})
        elif key == "ckpt_path":
            ckpt_path = value
        else:
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = yaml.safe_load(value)
    return cfg, ckpt_path


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def leaves(tree: object) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def content(cfg: dict) -> bytes:
    """Bytes that depend on the config and on every existing file it names."""
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for v in leaves(cfg):
        if isinstance(v, str) and os.path.isfile(v):
            with open(v, "rb") as f:
                h.update(f.read())
    return h.hexdigest().encode()


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def new_log_dir(root: str) -> str:
    """``<root>/lightning_logs/version_N`` with the first free N, as Lightning's CSVLogger picks it."""
    n = 0
    while os.path.exists(os.path.join(root, "lightning_logs", f"version_{n}")):
        n += 1
    return os.path.join(root, "lightning_logs", f"version_{n}")


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    cfg, ckpt_path = merged_config(rest)
    fake = cfg.get("fake") or {}
    root = (cfg.get("trainer") or {}).get("default_root_dir")
    entry = {"command": command, "root": root, "resumed_from": None, "pid": os.getpid()}
    ckpts = os.path.join(str(root), "checkpoints")
    start = 0
    if command == "fit" and ckpt_path == "last" and os.path.isfile(os.path.join(ckpts, "last.ckpt")):
        with open(os.path.join(ckpts, "last.ckpt")) as f:
            entry["resumed_from"] = json.load(f)["epoch"]
        start = entry["resumed_from"] + 1
    journal = os.environ.get("FAKE_KDL_JOURNAL")
    if journal:
        with open(journal, "a") as f:
            f.write(json.dumps(entry) + "\n")
    print(f"fake kdl {command}: {json.dumps(cfg, sort_keys=True)}", flush=True)
    if fake.get("needs") and not os.path.exists(fake["needs"]):
        print(f"kdl: error: {fake['needs']} does not exist yet", file=sys.stderr, flush=True)
        return 6
    if fake.get("touch"):
        write(fake["touch"], b"")
    if fake.get("wait_for"):
        deadline = time.monotonic() + float(fake.get("wait_s", 60))
        while not os.path.exists(fake["wait_for"]):
            if time.monotonic() > deadline:
                print(f"kdl: error: waited in vain for {fake['wait_for']}", file=sys.stderr, flush=True)
                return 5
            time.sleep(0.05)
    if fake.get("then_touch"):
        write(fake["then_touch"], b"")
    if fake.get("fetch"):
        with urllib.request.urlopen(fake["fetch"], timeout=10) as r:
            print(f"fetched {fake['fetch']} {r.status}", flush=True)
    if fake.get("fail"):
        print(f"kdl: error: fake failure in {command}", file=sys.stderr, flush=True)
        return int(fake["fail"])
    if command == "serve-teacher":
        port = str(cfg["port"])
        os.execv(sys.executable, [sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1"])
    if command == "fit":
        max_epochs = int((cfg.get("trainer") or {}).get("max_epochs", 1))
        metrics = os.path.join(new_log_dir(str(root)), "metrics.csv")
        rows = ["epoch,val/acc1"]
        for epoch in range(start, max_epochs):
            time.sleep(float(os.environ.get("FAKE_KDL_SLEEP", 0)))
            write(os.path.join(ckpts, "last.ckpt"), json.dumps({"epoch": epoch}).encode())
            rows.append(f"{epoch},{0.5 + 0.1 * epoch:.1f}")
            write(metrics, ("\n".join(rows) + "\n").encode())
            if os.environ.get("KDL_PROGRESS_FILE"):
                write(os.environ["KDL_PROGRESS_FILE"], f"epoch {epoch + 1}/{max_epochs}\n".encode())
            print(f"epoch {epoch} done", flush=True)
        write(os.path.join(ckpts, "best.ckpt"), content({k: v for k, v in cfg.items() if k != "fake"}))
        write(os.path.join(str(root), "plots", "curves.png"), b"not a png")
    elif command in ("test", "validate", "predict"):
        print("test/acc1 0.5", flush=True)
        if command == "test":
            write(os.path.join(new_log_dir(str(root)), "metrics.csv"), b"test/acc1,test/loss\n0.5,1.25\n")
    elif fake.get("out"):
        part = os.path.join(fake["out"], "part-0.bin")
        if fake.get("refuse_other") and os.path.isfile(part) and Path(part).read_bytes() != content(cfg):
            print(f"kdl {command}: error: {fake['out']} was written with other settings; refusing", file=sys.stderr)
            return 2
        write(part, content(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
