"""Frozen-network inference speed: what ``no_grad`` -> ``inference_mode``, channels-last, BatchNorm folding
and the batch size each buy, as a share of the fp32 matmul peak measured in this same process.

Variants are alternated within every repeat (so drifts of the machine hit all alike) and the median
images/s over the repeats is reported, with its ratio to the first variant (the unoptimised one) and
to the peak. Model FLOPs per image are counted with ``torch.utils.flop_counter`` on the unfolded net.

    python -m benchmarks.inference                       # ResNet-56, 32x32, 3 channels
    python -m benchmarks.inference --net resnet20 --channels 1 --out docs/results/inference.md

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import count_flops, fp32_peak_flops, report, seconds_per_call
from kd_lightning.cli import cpu_defaults
from kd_lightning.nets import create_net
from kd_lightning.nets.compile import compile_frozen
from kd_lightning.nets.fold import fold_bn

#: name -> (channels-last, inference_mode, folded, batch multiplier, compiled); None = --batch
VARIANTS: dict[str, tuple[bool, bool, bool, float | None, bool]] = {
    "no_grad, NCHW, unfolded": (False, False, False, None, False),
    "+ channels-last": (True, False, False, None, False),
    "+ inference_mode": (True, True, False, None, False),
    "+ BN folded": (True, True, True, None, False),
    "+ BN folded, batch x4": (True, True, True, 4, False),
    "+ BN folded, batch /4": (True, True, True, 0.25, False),
    "+ BN folded + compiled (inductor, freezing)": (True, True, True, None, True),
    "+ BN folded + compiled, batch /4": (True, True, True, 0.25, True),
}


def forward_flops(net: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return count_flops(lambda: net(x)) / len(x)


def images_per_second(net: torch.nn.Module, x: torch.Tensor, inference: bool, seconds: float) -> float:
    ctx = torch.inference_mode if inference else torch.no_grad
    with ctx():
        return len(x) / seconds_per_call(lambda: net(x), seconds)


def with_bn_stats(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics, as a trained net has (the folding must carry them)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="resnet56")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per variant and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the results as a markdown table here")
    args = p.parse_args()
    cpu_defaults()
    torch.manual_seed(0)
    net = with_bn_stats(create_net(args.net, num_classes=10, in_channels=args.channels))
    folded, pairs = fold_bn(net)
    nets = {}
    shape = (args.channels, args.image_size, args.image_size)
    compile_seconds = {}
    for name, (cl, _, fold, mult, compiled) in VARIANTS.items():
        key = (cl, fold, mult if compiled else None, compiled)  # a compiled net per batch size (static shapes)
        if key not in nets:
            m = copy.deepcopy(folded if fold else net)
            nets[key] = m.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        if compiled:
            compile_frozen(nets[key], torch.device("cpu"))
            t0 = time.perf_counter()
            with torch.inference_mode():
                nets[key](torch.rand(max(1, int(args.batch * (mult or 1))), *shape))
            compile_seconds[name] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: list[float] = []
    for r in range(args.repeats):
        peaks.append(fp32_peak_flops(seconds=0.6))  # per repeat: the load of the moment hits peak and nets alike
        for name, (cl, inference, fold, mult, compiled) in VARIANTS.items():
            x = torch.rand(max(1, int(args.batch * (mult or 1))), *shape)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            net_v = nets[cl, fold, mult if compiled else None, compiled]
            rates[name].append(images_per_second(net_v, x, inference, args.seconds))
            print(f"repeat {r}: {name:26s} {rates[name][-1]:8.1f} img/s", flush=True)
    flops = forward_flops(net, torch.rand(8, *shape))
    x = torch.rand(16, *shape)
    with torch.no_grad():
        diff = float((net(x) - folded(x)).abs().max() / net(x).abs().max().clamp(min=1))
    med = {v: statistics.median(x) for v, x in rates.items()}
    base = next(iter(VARIANTS))
    share = {v: statistics.median(x * flops / pk for x, pk in zip(rates[v], peaks)) for v in VARIANTS}
    ratio = {v: statistics.median(x / b for x, b in zip(rates[v], rates[base])) for v in VARIANTS}
    load = os.getloadavg()
    lines = [
        f"net {args.net}, {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, {args.repeats} alternated repeats of {args.seconds:.0f} s per variant, "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"fp32 matmul peak {statistics.median(peaks) / 1e9:.1f} GFLOP/s (median of one per repeat, same process; "
        f"{', '.join(f'{x / 1e9:.1f}' for x in peaks)}); forward {flops / 1e6:.1f} MFLOP per image; "
        f"{len(pairs)} conv+BN pairs folded, max |folded - unfolded| / max(1, max|logit|) = {diff:.1e}",
        "compilation (first call): " + ", ".join(f"{v} {s:.1f} s" for v, s in compile_seconds.items()),
        "",
        "| variant | median img/s | median ratio to first | median % of the repeat's fp32 peak | runs (img/s) |",
        "|---|---|---|---|---|",
        *[
            f"| {v} | {med[v]:.1f} | {ratio[v]:.2f} | {100 * share[v]:.1f}% | "
            f"{', '.join(f'{x:.0f}' for x in rates[v])} |"
            for v in VARIANTS
        ],
    ]
    report("\n".join(lines), args.out, "Frozen-network inference")


if __name__ == "__main__":
    main()
