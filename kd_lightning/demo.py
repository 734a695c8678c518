"""``make demo``: a teacher, a student trained alone (NOKD) and a student distilled from the teacher (BLKD).

Runs the Fashion-MNIST recipes (or the digits recipes when Fashion-MNIST is not on disk) through
kdl itself, tests each best-on-validation checkpoint on the held-out test split, and prints
top-1, macro-F1, ECE, parameters and training images/s. ``--epochs``/``--train-size`` set the size
(``make demo EPOCHS=3 TRAIN_SIZE=5000``; README.md gives the times measured).

Each run leaves ``plots/curves.png`` and, from its test, ``plots/reliability.png`` in its folder. A run
already done with the same settings (and, for the BLKD student, the same teacher checkpoint) is not
trained again: its row is read back from ``demo.json`` in its folder; ``--force`` retrains everything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.callbacks import TrainThroughput
from kd_lightning.cli import build_cli, cpu_defaults, quiet_lightning
from kd_lightning.cpu import cpu_has_fast_bf16
from kd_lightning.data.mnist import FASHION_MNIST_DEBIAN_ROOT
from kd_lightning.pipeline import _file_sha

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the demo's command line."""
    p = argparse.ArgumentParser(prog="python -m kd_lightning.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=FASHION_MNIST_DEBIAN_ROOT, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-size", type=int, default=10000, help="stratified training subset (0 = all)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain runs already done with the same settings")
    p.add_argument(
        "--precision",
        default="32-true",
        choices=("auto", "32-true", "bf16-mixed"),
        help="trainer precision; auto: bf16-mixed on a CPU-only machine with AMX bf16 tiles, else 32-true "
        "(docs/performance.md: 1.6x faster on such a CPU, 0.4-0.7 points lower top-1 for one seed)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the trained nets (the Compile callback; docs/performance.md: pays on runs of many minutes)",
    )
    return p.parse_args(argv)


def amx_bf16_available() -> bool:
    """Whether this CPU runs bf16 on AMX tiles (:func:`kd_lightning.cpu.cpu_has_fast_bf16`, kdl's one check)."""
    return cpu_has_fast_bf16()


def resolve_precision(requested: str) -> str:
    """``auto`` -> ``bf16-mixed`` on a CPU-only machine with AMX bf16, else ``32-true``; others unchanged."""
    if requested != "auto":
        return requested
    import torch

    return "bf16-mixed" if not torch.cuda.is_available() and amx_bf16_available() else "32-true"


def run_stage(
    name: str, recipe: Path, net: str, args: argparse.Namespace, data_args: list[str], model_args: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Fit ``recipe`` with ``net``, then test its best checkpoint; return the table row.

    A run whose ``demo.json`` records the same settings (and whose ``best.ckpt`` is there) is skipped.
    """
    root_dir = str(Path(args.out) / name)
    settings = {
        "recipe": str(recipe.relative_to(RECIPES.parent)),
        "net": net,
        "epochs": args.epochs,
        "seed": args.seed,
        "precision": args.precision,
        "compile": args.compile,
        "data": data_args,
        "model": list(model_args),
        "inputs": {a: _file_sha(a) for a in model_args if a.endswith(".ckpt") and Path(a).is_file()},
    }
    record, best = Path(root_dir) / "demo.json", Path(root_dir) / "checkpoints" / "best.ckpt"
    if not args.force and record.is_file() and best.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings") == settings:
            print(f"\n=== {name}: done before with the same settings, not retrained ({record}; --force retrains)")
            return dict(saved["row"])
    replace_earlier_run(Path(root_dir))
    common = [
        "--config",
        str(recipe),
        "--model.init_args.net",
        net,
        "--trainer.default_root_dir",
        root_dir,
        "--seed_everything",
        str(args.seed),
        "--trainer.precision",
        args.precision,
        *data_args,
        *model_args,
    ]
    fit_args = [
        *common,
        "--trainer.max_epochs",
        str(args.epochs),
        "--model.init_args.lr_scheduler.init_args.T_max",
        str(args.epochs),
        "--trainer.enable_model_summary",  # the table at the end gives every net's parameters
        "false",
        *(["--trainer.callbacks+=kd_lightning.callbacks.Compile"] if args.compile else []),
    ]
    meter = TrainThroughput()
    print(f"\n=== {name}: {net} ({recipe.relative_to(RECIPES.parent)}) ===", flush=True)
    t0 = time.perf_counter()
    cli = build_cli(fit_args, run=False)
    cli.trainer.callbacks.append(meter)  # type: ignore[attr-defined]  # Lightning sets Trainer.callbacks at run time
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_s = time.perf_counter() - t0
    best = Path(root_dir) / "checkpoints" / "best.ckpt"
    checkpoint = cli.trainer.checkpoint_callback
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None
    val_acc = float(checkpoint.best_model_score)
    calibration = {
        "class_path": "kd_lightning.callbacks.TemperatureScaling",
        "init_args": {"output_dir": str(Path(root_dir) / "plots")},
    }
    # Lightning's own table of every test metric is left out (--verbose false): the calibration line and the table at
    # the end give the test metrics
    test_args = ["test", *common, f"--trainer.callbacks+={json.dumps(calibration)}", "--ckpt_path", str(best)]
    test = build_cli([*test_args, "--verbose", "false"])
    m = test.trainer.callback_metrics
    row = {
        "name": name,
        "net": net,
        "params": sum(p.numel() for p in cli.model.net.parameters()),
        "val_acc1": val_acc,
        "test_acc1": float(m["test/acc1"]),
        "test_f1": float(m["test/f1"]),
        "test_ece": float(m["test/ece"]),
        "img_s": meter.images_per_second,
        "n_train": len(cli.datamodule.train_dataset),
        "fit_min": fit_s / 60,
        "ckpt": str(best),
        "plots": [str(p) for p in sorted((Path(root_dir) / "plots").glob("*.png"))],
    }
    record.write_text(json.dumps({"settings": settings, "row": row}, indent=2) + "\n")
    return row


def replace_earlier_run(root: Path) -> None:
    """Remove what an earlier demo run (other settings, or ``--force``) left in ``root`` before training again.

    Otherwise its ``lightning_logs/version_*`` stay beside the new ones, and ``kdl report`` and the notebooks, which
    read every version of a run folder, would mix the two runs' curves.
    """
    parts = [root / p for p in ("lightning_logs", "checkpoints", "plots", "demo.json") if (root / p).exists()]
    if not parts:
        return
    print(f"\n(replacing the earlier run in {root}: {', '.join(p.name for p in parts)})")
    for part in parts:
        if part.is_dir():
            shutil.rmtree(part)
        else:
            part.unlink()


def print_table(rows: list[dict], dataset: str, args: argparse.Namespace) -> None:
    """Print the results table of the teacher and student runs."""
    print(
        f"\nResults on {dataset} (held-out test split; checkpoint chosen on validation top-1), "
        f"{args.epochs} epochs, {rows[0]['n_train']} training images, seed {args.seed}, precision {args.precision}"
        f"{', compiled' if args.compile else ''}:\n"
    )
    print("| run | net | params | val top-1 | test top-1 | test macro-F1 | test ECE | train img/s | fit min |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['net']} | {r['params'] / 1e6:.2f}M | {100 * r['val_acc1']:.2f}% | "
            f"{100 * r['test_acc1']:.2f}% | {100 * r['test_f1']:.2f}% | {100 * r['test_ece']:.2f}% | "
            f"{r['img_s']:.0f} | {r['fit_min']:.1f} |"
        )
    print("\nCheckpoints:")
    for r in rows:
        print(f"  {r['name']}: {r['ckpt']}")
    print(f"Logs (metrics.csv, config.yaml): {args.out}/<run>/lightning_logs/")
    print("Plots (learning curves; reliability diagram of the test split before/after temperature scaling):")
    for r in rows:
        for png in r.get("plots", []):
            print(f"  {png}")
    if warning := weak_teacher_warning(rows, args.epochs):
        print(warning)


def weak_teacher_warning(rows: list[dict], epochs: int) -> str | None:
    """A note when the teacher tests below the student trained alone: distilling from it cannot show KD's gain."""
    by_name = {r["name"]: r for r in rows}
    teacher, alone = by_name.get("teacher"), by_name.get("student_nokd")
    if teacher is None or alone is None or teacher["test_acc1"] >= alone["test_acc1"]:
        return None
    return (
        f"\nNote: the teacher ({100 * teacher['test_acc1']:.2f}% test top-1) is below the student trained alone "
        f"({100 * alone['test_acc1']:.2f}%), so the distilled student learns from a worse model: with "
        f"{rows[0]['n_train']} images, {epochs} epoch(s) are too few for the larger net. "
        "Train longer (make demo EPOCHS=3 TRAIN_SIZE=5000 or more) to see distillation help."
    )


def main(argv: list[str] | None = None) -> int:
    """Train the teacher and the students, then print the results table; return the exit status."""
    args = parse_args(argv)
    args.precision = resolve_precision(args.precision)
    quiet_lightning()
    cpu_defaults()
    # a small demo (TRAIN_SIZE=2000: 15 batches an epoch) is below Lightning's step-logging interval; the per-epoch
    # metrics the demo reads are logged all the same, so Lightning's advice about it is not about this run
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    # a run retrained with other settings (another EPOCHS) replaces the demo's own checkpoints on purpose
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    fashion = Path(args.root)
    if all(
        (fashion / f"{s}.gz").is_file() or (fashion / s).is_file()
        for s in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
    ):
        is_debian = fashion.resolve() == Path(FASHION_MNIST_DEBIAN_ROOT).resolve()
        dataset = f"Fashion-MNIST ({fashion})" if is_debian else f"MNIST-format data from {fashion}"
        folder = "fashion_mnist"
        data_args = ["--data.init_args.root", str(fashion)]
        if args.train_size:
            data_args += ["--data.init_args.train_size", str(args.train_size)]
    else:
        print(
            f"Fashion-MNIST not found under {fashion}: using scikit-learn's digits instead.\n"
            "(Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist)",
            file=sys.stderr,
        )
        dataset, folder, data_args = "scikit-learn digits", "digits", []
    teacher = run_stage("teacher", RECIPES / folder / "teacher.yaml", args.teacher, args, data_args)
    rows = [
        teacher,
        run_stage("student_nokd", RECIPES / folder / "student.yaml", args.student, args, data_args),
        run_stage(
            "student_blkd",
            RECIPES / folder / "blkd.yaml",
            args.student,
            args,
            data_args,
            ("--model.init_args.teacher", teacher["ckpt"]),
        ),
    ]
    print_table(rows, dataset, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
