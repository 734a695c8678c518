"""Self-KD evidence on Fashion-MNIST: baseline vs CS-KD vs TF-KD vs PS-KD vs AI-KD vs AI-KD "No Adv".

Every run is the shipped recipe (``recipes/fashion_mnist/*.yaml``) through ``kdl fit`` then ``kdl test
--ckpt_path best.ckpt`` (model selected on validation accuracy), with a shorter budget given on the
command line. The test stage fits the temperature on the validation split and reports test top-1/top-5
error, macro-F1, ECE and ECE after temperature scaling (:class:`kd_lightning.callbacks.TemperatureScaling`).
S_sup (the pre-trained copy used by TF-KD and AI-KD) is the baseline run of the first seed.

    OMP_NUM_THREADS=1 python -m benchmarks.self_kd_fashion_mnist --out runs/evidence/self_kd
    OMP_NUM_THREADS=1 python -m benchmarks.self_kd_fashion_mnist --methods baseline aikd aikd_noadv  # AI-KD only

writes ``<out>/<method>/seed<k>/`` per run, ``<out>/results.json`` (every run) and ``<out>/summary.md``
(mean ± std over seeds). A finished run (its ``calibration.json`` exists) is not run again, so two processes can
share one ``--out`` (e.g. ``--seeds 0 2`` and ``--seeds 1 --ssup-seed 0``: the second waits for S_sup's run to
finish); a last call with every seed then only writes the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import QUIET, REPO

RECIPES = REPO / "recipes" / "fashion_mnist"

#: method -> (recipe, extra arguments); "{ssup}" is replaced by the S_sup checkpoint
METHODS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("student.yaml", []),
    "cskd": ("cskd.yaml", []),
    "tfkd": ("tfkd.yaml", ["--model.init_args.pretrained", "{ssup}"]),
    "pskd": ("pskd.yaml", []),
    "aikd": ("aikd.yaml", ["--model.init_args.pretrained", "{ssup}"]),
    "aikd_noadv": (
        "aikd.yaml",
        ["--model.init_args.pretrained", "{ssup}", "--model.init_args.adversarial_weight", "0"],
    ),
}
LABELS = {
    "baseline": "Baseline (CE)",
    "cskd": "CS-KD",
    "tfkd": "TF-KD (self)",
    "pskd": "PS-KD",
    "aikd": "AI-KD",
    "aikd_noadv": "AI-KD No Adv",
}
COLUMNS = (
    ("top1_error", "top-1 err (%)", 2),
    ("top5_error", "top-5 err (%)", 2),
    ("f1", "macro-F1", 4),
    ("ece", "ECE (%)", 2),
    ("ece_ts", "ECE after TS (%)", 2),
)


def kdl(*args: str, log: Path) -> float:
    """Run ``python -m kd_lightning.cli ARGS`` (output to ``log``); return the wall time in seconds."""
    start = time.time()
    with log.open("a") as f:
        f.write(f"$ kdl {' '.join(args)}\n")
        f.flush()
        res = subprocess.run(
            [sys.executable, "-m", "kd_lightning.cli", *args],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    if res.returncode != 0:
        raise SystemExit(f"kdl {args[0]} failed (exit {res.returncode}); see {log}")
    return time.time() - start


def wait_for_ssup(args: argparse.Namespace) -> None:
    """Block until the S_sup baseline run (maybe another process's) has finished."""
    done = args.out / "baseline" / f"seed{args.ssup_seed}" / "result.json"
    while not done.is_file():
        time.sleep(10)


def run_one(method: str, seed: int, args: argparse.Namespace, ssup: Path) -> dict:
    recipe, extra = METHODS[method]
    if any("{ssup}" in a for a in extra):
        wait_for_ssup(args)
    run_dir = args.out / method / f"seed{seed}"
    report = run_dir / "calibration.json"
    if report.is_file():
        return json.loads((run_dir / "result.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    fragment = run_dir / "calibration_callback.yaml"
    fragment.write_text(
        "trainer:\n  callbacks:\n    - class_path: kd_lightning.callbacks.TemperatureScaling\n"
        f"      init_args: {{output_dir: {json.dumps(str(run_dir))}}}\n"
    )
    common = [
        "--config",
        str(RECIPES / recipe),
        "--config",
        str(fragment),
        "--seed_everything",
        str(seed),
        "--trainer.max_epochs",
        str(args.epochs),
        "--model.init_args.lr_scheduler.init_args.T_max",
        str(args.epochs),
        "--data.init_args.train_size",
        str(args.train_size),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        str(args.batch_size),
        "--data.init_args.val_fraction",
        str(args.val_fraction),
        "--data.init_args.root",
        args.root,
        "--trainer.default_root_dir",
        str(run_dir),
        *QUIET,
        *[a.replace("{ssup}", str(ssup)) for a in extra],
    ]
    log = run_dir / "log.txt"
    fit_s = kdl("fit", *common, log=log)
    test_s = kdl("test", *common, "--ckpt_path", str(run_dir / "checkpoints" / "best.ckpt"), log=log)
    result = {"method": method, "seed": seed, "fit_s": fit_s, "test_s": test_s, **json.loads(report.read_text())}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{method:11s} seed {seed}: top-1 err {result['top1_error']:.2f}%  ECE {result['ece']:.2f}% -> "
        f"{result['ece_ts']:.2f}%  fit {fit_s:.0f}s",
        flush=True,
    )
    return result


def summarise(results: list[dict], args: argparse.Namespace) -> str:
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"Fashion-MNIST, resnet8, train_size {args.train_size} (stratified), {args.epochs} epochs, batch "
        f"{args.batch_size}, validation {args.val_fraction:.0%} of the training file, seeds {seeds}; mean ± std over "
        "seeds on the 10,000 test images (model selected and temperature fitted on validation).",
        "",
        "| method | " + " | ".join(c[1] for c in COLUMNS) + " | fit time (s) |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        cells = []
        for key, _, digits in COLUMNS:
            values = [r[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}")
        fit = statistics.mean(r["fit_s"] for r in rows)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {fit:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/self_kd_fashion_mnist"))
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ssup-seed", type=int, default=None, help="whose baseline run is S_sup (default: the first seed)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ssup_seed is None:
        args.ssup_seed = args.seeds[0]
    start = time.time()
    results = []
    if args.ssup_seed in args.seeds:
        results.append(run_one("baseline", args.ssup_seed, args, Path()))
    ssup = args.out / "baseline" / f"seed{args.ssup_seed}" / "checkpoints" / "best.ckpt"
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) != ("baseline", args.ssup_seed):
                results.append(run_one(method, seed, args, ssup))
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = summarise(results, args)
    summary += (
        f"\nS_sup (TF-KD, AI-KD): the baseline of seed {args.ssup_seed}. Total wall time {time.time() - start:.0f} s.\n"
    )
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
