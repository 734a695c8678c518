"""Throughput of ``kdl fit`` against a plain PyTorch loop on the same net, data and batch size.

Both run in this one process, alternating (kdl, plain, kdl, plain, ...) so that drifts of the machine
hit both alike. Images per second are measured over the steady-state training steps: the time
between the starts of consecutive training steps of an epoch (data loading + forward + backward +
optimiser step + whatever the framework does per step), after ``--warmup-steps``. Validation,
checkpointing at epoch end and start-up are not in the step times of either.

It prints the median ratio kdl/plain of images/s, and kdl's images/s as a share of the machine's
fp32 peak, measured here as the best of a few large ``torch.mm`` runs (model FLOPs per image are
counted with ``torch.utils.flop_counter`` on one training step: forward + backward).

    python -m benchmarks.throughput                      # ResNet-20, batch 64, digits at 32x32
    python -m benchmarks.throughput --lean               # also without logger/checkpoint/progress bar
    python -m benchmarks.throughput --out docs/results/throughput.md
    python -m benchmarks.throughput --compile            # also both compiled (kdl: the Compile callback)
    python -m benchmarks.throughput --accelerator gpu --precision bf16-mixed --peak-flops 989e12   # MFU on a GPU

Timings vary with the machine's load (here 2x between runs): never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import (
    NO_CHECKPOINTS,
    NO_LOGGER,
    REPO,
    StepTimer,
    count_flops,
    fp32_peak_flops,
    quiet_lightning,
    report,
    steady_rate,
    sync,
)
from kd_lightning.cli import build_cli, cpu_defaults
from kd_lightning.data import DigitsDataModule
from kd_lightning.methods.base import Normalize
from kd_lightning.nets import create_net

RECIPE = REPO / "recipes" / "digits" / "student.yaml"


def run_kdl(args: argparse.Namespace, lean: bool, compiled: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--config",
            str(RECIPE),
            "--model.init_args.net",
            args.net,
            "--trainer.max_epochs",
            str(args.epochs),
            "--data.init_args.image_size",
            str(args.image_size),
            "--data.init_args.batch_size",
            str(args.batch),
            "--trainer.default_root_dir",
            tmp,
            "--model.init_args.lr_scheduler.init_args.T_max",
            str(args.epochs),
            "--trainer.accelerator",
            args.accelerator,
            "--trainer.precision",
            args.precision,
        ]
        if args.limit_batches:
            argv += ["--trainer.limit_train_batches", str(args.limit_batches), "--trainer.limit_val_batches", "0"]
        if lean:
            argv += [*NO_LOGGER, *NO_CHECKPOINTS]
        if compiled:
            argv += ["--trainer.callbacks+=kd_lightning.callbacks.Compile"]
        cli = build_cli(argv, run=False)
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return steady_rate(timer.starts, args.batch, args.warmup_steps)


def run_plain(args: argparse.Namespace, compiled: bool = False) -> float:
    """The same net, data, augmentation, loss and optimiser in a hand-written loop."""
    dm = DigitsDataModule(batch_size=args.batch, image_size=args.image_size)
    dm.setup("fit")
    loader = DataLoader(
        dm.train_dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=dm.num_workers,
        persistent_workers=dm.num_workers > 0,
    )
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    net = create_net(args.net, num_classes=10, in_channels=1).to(device, memory_format=torch.channels_last)
    normalize = Normalize(dm.mean, dm.std, 1).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if compiled:
        net.compile(dynamic=False)  # what the Compile callback does
    criterion = nn.CrossEntropyLoss()
    net.train()
    bf16 = args.precision.startswith("bf16")
    starts: list[tuple[int, float]] = []
    for epoch in range(args.epochs):
        for i, batch in enumerate(loader):
            if args.limit_batches and i >= args.limit_batches:
                break
            sync(device)
            starts.append((epoch, time.perf_counter()))
            x = normalize(batch["image"].to(device)).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(net(x), batch["label"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return steady_rate(starts, args.batch, args.warmup_steps)


def train_flops_per_image(args: argparse.Namespace) -> float:
    net = create_net(args.net, num_classes=10, in_channels=1).to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, 1, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(args.batch, dtype=torch.long)
    return count_flops(lambda: nn.functional.cross_entropy(net(x), labels).backward()) / args.batch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (digits: 20 steps each at batch 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--lean", action="store_true", help="also time kdl with logger/checkpoint/progress bar off")
    p.add_argument("--limit-batches", type=int, help="training batches per epoch (default: all)")
    p.add_argument("--accelerator", default="cpu", help="cpu or gpu (kdl and the plain loop alike)")
    p.add_argument("--precision", default="32-true", help="32-true or bf16-mixed (the plain loop: autocast)")
    p.add_argument(
        "--compile", action="store_true", help="also time both with the net compiled (kdl: the Compile callback)"
    )
    p.add_argument("--peak-flops", type=float, help="the peak to compare with (FLOP/s; a GPU's bf16 peak)")
    p.add_argument("--out", type=Path, help="write the results as a markdown table here")
    args = p.parse_args(argv)
    quiet_lightning()
    cpu_defaults()

    variants = (
        ["kdl", "plain"]
        + (["kdl-lean"] if args.lean else [])
        + (["kdl-compiled", "plain-compiled"] if args.compile else [])
    )
    rates: dict[str, list[float]] = {v: [] for v in variants}
    peaks: list[float] = []
    for r in range(args.repeats):
        # per repeat: on a loaded machine the peak moves with the load, as the runs beside it do
        peaks.append(args.peak_flops or fp32_peak_flops(seconds=0.6))
        for v in variants:
            torch.manual_seed(r)
            compiled = v.endswith("-compiled")
            rate = run_plain(args, compiled) if v.startswith("plain") else run_kdl(args, v == "kdl-lean", compiled)
            rates[v].append(rate)
            print(f"repeat {r}: {v:9s} {rate:8.1f} img/s", flush=True)
    peak = statistics.median(peaks)
    flops = train_flops_per_image(args)
    ratios = [k / p for k, p in zip(rates["kdl"], rates["plain"])]
    med = {v: statistics.median(x) for v, x in rates.items()}
    shares = {v: statistics.median(x * flops / pk for x, pk in zip(rates[v], peaks)) for v in variants}
    share = shares["kdl"]
    load = os.getloadavg()
    measured = ", ".join(f"{x / 1e9:.1f}" for x in peaks)
    lines = [
        f"net {args.net}, batch {args.batch}, {args.image_size}x{args.image_size} digits, {args.accelerator}, "
        f"{args.precision}, {torch.get_num_threads()} threads, {args.repeats} alternating repeats of {args.epochs} "
        f"epochs; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "",
        "| run | median img/s | runs (img/s) |",
        "|---|---|---|",
        *[f"| {v} | {med[v]:.1f} | {', '.join(f'{x:.1f}' for x in rates[v])} |" for v in variants],
        "",
        f"median ratio kdl/plain img/s: {statistics.median(ratios):.3f} (per repeat: "
        f"{', '.join(f'{x:.3f}' for x in ratios)})",
    ]
    if args.lean:
        lean = [k / p for k, p in zip(rates["kdl-lean"], rates["plain"])]
        lines.append(f"median ratio kdl-lean/plain img/s: {statistics.median(lean):.3f}")
    if args.compile:
        for v in ("kdl", "plain"):
            gain = [c / e for c, e in zip(rates[f"{v}-compiled"], rates[v])]
            lines.append(f"median ratio {v}-compiled/{v} img/s: {statistics.median(gain):.3f}")
    lines += [
        f"{'given' if args.peak_flops else 'fp32 matmul'} peak: {peak / 1e9:.1f} GFLOP/s"
        f"{'' if args.peak_flops else ' (median of one measured before each repeat: ' + measured + ')'}"
        f"; training FLOPs per image: {flops / 1e6:.1f} MFLOP",
        f"kdl: {med['kdl']:.1f} img/s = {100 * share:.1f}% of the peak (median over repeats of the share of that "
        f"repeat's peak; " + "; ".join(f"{v}: {100 * shares[v]:.1f}%" for v in variants if v != "kdl") + ")",
    ]
    report("\n".join(lines), args.out, "Throughput: kdl fit vs a plain PyTorch loop")


if __name__ == "__main__":
    main()
