"""What caching the teacher's outputs saves: BLKD training steps with and without ``cache_teacher``.

Three kinds of run, alternated in this one process so that drifts of the machine hit all alike:
the NOKD student alone (``ImageClassifier``: the floor), BLKD with the teacher run every step, and
BLKD with the teacher's outputs cached by sample index (the cache fills in the first epoch; the
later epochs are timed). Images per second count data loading and the step, not validation.

    python -m benchmarks.teacher_cache --teacher runs/fashion_mnist/teacher/checkpoints/best.ckpt

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L

from benchmarks.common import NO_LOGGER, REPO, quiet_lightning
from kd_lightning.callbacks import TrainThroughput
from kd_lightning.cli import build_cli, cpu_defaults


class LaterEpochs(TrainThroughput):
    """Throughput of every epoch but the first (the one that fills the cache)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.current_epoch == 1:
            self.images, self.seconds = 0, 0.0


def rate(kind: str, args: argparse.Namespace, tmp: str) -> float:
    recipe = "student.yaml" if kind == "nokd" else "blkd.yaml"
    cli_args = [
        "--config",
        str(REPO / "recipes" / "fashion_mnist" / recipe),
        "--model.init_args.net",
        args.student,
        "--data.init_args.root",
        args.root,
        "--data.init_args.train_size",
        str(args.train_size),
        "--data.init_args.augment",
        "false",
        "--data.init_args.val_fraction",
        "0.01",
        "--trainer.max_epochs",
        str(args.epochs),
        "--trainer.default_root_dir",
        f"{tmp}/{kind}",
        *NO_LOGGER,
    ]
    if kind != "nokd":
        cli_args += [
            "--model.init_args.teacher",
            args.teacher,
            "--model.init_args.cache_teacher",
            str(kind == "cached").lower(),
        ]
    cli = build_cli(cli_args, run=False)
    meter = LaterEpochs()
    cli.trainer.callbacks.append(meter)
    cli.trainer.fit(cli.model, cli.datamodule)
    return meter.images_per_second


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", default="resnet8")
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    quiet_lightning()
    cpu_defaults()
    kinds = ("nokd", "teacher_every_step", "cached")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for kind in kinds:
                rates[kind].append(rate(kind, args, tmp))
                print(f"{kind}: {rates[kind][-1]:.0f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [
        f"Student {args.student}, teacher {Path(args.teacher).name}, Fashion-MNIST {args.train_size} images, "
        f"batch 128, epochs 2-{args.epochs} timed, median of {args.repeats} alternated runs:",
        "",
        "| run | train img/s | vs NOKD |",
        "|---|---:|---:|",
    ]
    for kind in kinds:
        lines.append(f"| {kind} | {med[kind]:.0f} | {med[kind] / med['nokd']:.2f}x |")
    speedup = med["cached"] / med["teacher_every_step"]
    lines.append(f"\nBLKD step cost with the teacher every step / with the cache: {speedup:.2f}x")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
