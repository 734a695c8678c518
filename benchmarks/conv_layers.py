"""How close each convolution of a CIFAR ResNet comes to the fp32 matmul peak, forward and backward, alone.

The convolutions are the part of a training step no fusion removes, so their share of the peak bounds the step's
(docs/performance.md section 0). For every distinct 3x3 convolution shape of a CIFAR ResNet (16/32/64 channels,
stride 1 and the stride-2 stage entries) on a channels-last batch, it times the forward pass and the backward
pass (input and weight gradients: twice the forward FLOPs) and reports the median share of the peak over
alternated repeats, with the peak measured before each repeat in this process. Also the share of all of
ResNet-20's convolutions together, forward and backward (the bound of a training step), and of ResNet-56's
forward passes alone (the bound of frozen-net inference), each weighted by how often the shape occurs.

    python -m benchmarks.conv_layers --batch 64 --out docs/results/conv_layers.md

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import fp32_peak_flops, report, seconds_per_call
from kd_lightning.cli import cpu_defaults

#: (in channels, out channels, input side, stride, occurrences in ResNet-20, in ResNet-56) on 32x32 inputs
SHAPES = [
    (16, 16, 32, 1, 6, 18),
    (16, 32, 32, 2, 1, 1),
    (32, 32, 16, 1, 5, 17),
    (32, 64, 16, 2, 1, 1),
    (64, 64, 8, 1, 5, 17),
]


def time_conv(cin: int, cout: int, side: int, stride: int, batch: int, seconds: float) -> tuple[float, float, float]:
    """(forward FLOPs, forward seconds, backward seconds) per call, medians of ``torch.utils.benchmark.Timer``."""
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = conv(x)
    grad = torch.randn_like(y)
    flops = 2.0 * y.numel() * cin * 9
    forward = seconds_per_call(lambda: conv(x), seconds)
    backward = seconds_per_call(lambda: torch.autograd.grad(y, (x, conv.weight), grad, retain_graph=True), seconds)
    return flops, forward, backward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=0.2, help="timed seconds per shape, pass and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cpu_defaults()
    torch.manual_seed(0)
    shares: dict[tuple, list[tuple[float, float]]] = {s: [] for s in SHAPES}
    times: dict[tuple, list[tuple[float, float, float]]] = {s: [] for s in SHAPES}
    peaks = []
    for _ in range(args.repeats):
        peak = fp32_peak_flops(seconds=0.6)
        peaks.append(peak)
        for s in SHAPES:
            flops, tf, tb = time_conv(*s[:4], args.batch, args.seconds)
            shares[s].append((flops / tf / peak, 2 * flops / tb / peak))
            times[s].append((flops, tf, tb))
    lines = [
        f"batch {args.batch}, channels-last, 3x3 convolutions without bias, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats, each call timed for {args.seconds} s (median call); fp32 matmul peak per repeat "
        f"{', '.join(f'{x / 1e9:.1f}' for x in peaks)} GFLOP/s; load average at the end "
        + " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "",
        "| convolution | in ResNet-20 / 56 | forward: % of peak | backward: % of peak | forward ms | backward ms |",
        "|---|---|---|---|---|---|",
    ]
    total_flops, total_time = [0.0] * args.repeats, [0.0] * args.repeats
    fwd_flops, fwd_time = [0.0] * args.repeats, [0.0] * args.repeats
    for s in SHAPES:
        cin, cout, side, stride, n, n56 = s
        fwd = statistics.median(a for a, _ in shares[s])
        bwd = statistics.median(b for _, b in shares[s])
        tf = statistics.median(t[1] for t in times[s])
        tb = statistics.median(t[2] for t in times[s])
        lines.append(
            f"| {cin}->{cout}, {side}x{side}, stride {stride} | x{n} / x{n56} | {100 * fwd:.1f}% | {100 * bwd:.1f}% | "
            f"{1e3 * tf:.2f} | {1e3 * tb:.2f} |"
        )
        for r, (flops, t_f, t_b) in enumerate(times[s]):
            total_flops[r] += n * 3 * flops
            total_time[r] += n * (t_f + t_b)
            fwd_flops[r] += n56 * flops
            fwd_time[r] += n56 * t_f
    overall = statistics.median(f / t / pk for f, t, pk in zip(total_flops, total_time, peaks))
    inference = statistics.median(f / t / pk for f, t, pk in zip(fwd_flops, fwd_time, peaks))
    lines += [
        "",
        f"ResNet-20's 3x3 convolutions together (forward + backward, weighted by occurrence): {100 * overall:.1f}% "
        "of the peak: the most a training step could reach if everything else (BatchNorm, ReLU, residual adds, "
        "loss, optimiser) cost nothing.",
        f"ResNet-56's 3x3 convolutions, forward only: {100 * inference:.1f}% of the peak: the same bound for "
        "frozen-net inference (the stem convolution and the classifier are left out of both).",
    ]
    report("\n".join(lines), args.out, "Convolutions alone: share of the fp32 peak")


if __name__ == "__main__":
    main()
