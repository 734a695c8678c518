"""Training-step levers on the CPU, in one process: channels-last vs NCHW eager, ``torch.compile``, and a bound.

The bound is the same net with every BatchNorm replaced by ``nn.Identity``: what the step would reach if the
BatchNorm passes (forward statistics + normalisation, backward reductions) cost nothing, i.e. the most any
fusion of them could give. Its FLOPs are counted as the full net's (the flop counter gives BatchNorm none).

The plain loop of ``benchmarks/throughput.py`` (ResNet-20, SGD, in-memory batch) for each variant; variants
alternate within every repeat, the fp32 matmul peak is measured before each repeat, and medians of per-repeat
ratios are printed. The first two steps of each variant (compilation included) are timed apart.

    python -m benchmarks.train_variants --batch 64

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import fp32_peak_flops, report
from kd_lightning.nets import create_net

#: name -> (channels-last, compiled, BatchNorm kept)
VARIANTS = {
    "channels-last eager": (True, False, True),
    "NCHW eager": (False, False, True),
    "channels-last compiled": (True, True, True),
    "channels-last eager, BatchNorm removed (bound)": (True, False, False),
}


def without_batchnorm(net: nn.Module) -> nn.Module:
    """``net`` with every BatchNorm2d replaced by ``nn.Identity`` (in place)."""
    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(net, name, nn.Identity())
        else:
            without_batchnorm(child)
    return net


def make_step(net_name: str, batch: int, channels_last: bool, compiled: bool, batchnorm: bool = True):
    net = create_net(net_name, num_classes=10, in_channels=1)
    if not batchnorm:
        net = without_batchnorm(net)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.rand(batch, 1, 32, 32).contiguous(memory_format=fmt), torch.randint(0, 10, (batch,))
    fwd = torch.compile(net, dynamic=False) if compiled else net

    def step() -> None:
        loss = nn.functional.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flops-per-image", type=float, default=242.8e6, help="ResNet-20 training, 1x32x32")
    p.add_argument("--out", type=Path, help="write the results as a markdown table here")
    p.add_argument("--profile", action="store_true", help="also torch.profiler's top operators of the first variant")
    args = p.parse_args()
    torch.manual_seed(0)
    steps = {}
    first: dict[str, float] = {}
    for name, (cl, comp, bn) in VARIANTS.items():
        steps[name] = make_step(args.net, args.batch, cl, comp, bn)
        t0 = time.perf_counter()
        steps[name]()
        steps[name]()
        first[name] = time.perf_counter() - t0
        print(f"{name}: first two steps {first[name]:.1f} s", flush=True)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks = []
    for _ in range(args.repeats):
        peaks.append(fp32_peak_flops(seconds=0.5))
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))
    base = next(iter(VARIANTS))
    load = os.getloadavg()
    lines = [
        f"net {args.net}, batch {args.batch}, 1x32x32, plain loop on an in-memory batch, {torch.get_num_threads()} "
        f"threads, {args.repeats} alternated repeats of {args.steps} steps; fp32 matmul peak per repeat "
        f"{', '.join(f'{x / 1e9:.1f}' for x in peaks)} GFLOP/s; load average at the end {load[0]:.2f} / "
        f"{load[1]:.2f} / {load[2]:.2f}",
        "",
        "| variant | first two steps (s) | median img/s | median ratio to the first | median % of the repeat's peak |",
        "|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[base]))
        share = statistics.median(a * args.flops_per_image / pk for a, pk in zip(rates[name], peaks))
        lines.append(
            f"| {name} | {first[name]:.1f} | {statistics.median(rates[name]):.1f} | {ratio:.2f} | {100 * share:.1f}% |"
        )
    if args.profile:
        lines += ["", *profile_ops(steps[base], args.steps)]
    report("\n".join(lines), args.out, "Training-step variants (plain loop)")


def profile_ops(step: Callable[[], None], n: int, top: int = 12) -> list[str]:
    """The ``top`` operators by self CPU time over ``n`` steps, as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    rows = [f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count // n} |" for e in ops[:top]]
    return [
        f"Top operators of the first variant, `torch.profiler` over {n} steps (self CPU time):",
        "",
        "| operator | share of the step | calls per step |",
        "|---|---|---|",
        *rows,
    ]


if __name__ == "__main__":
    main()
