"""Training-step levers on the CPU, in one process: channels-last vs NCHW eager, and ``torch.compile``.

The plain loop of ``benchmarks/throughput.py`` (ResNet-20, SGD, in-memory batch) for each variant; variants
alternate within every repeat, the fp32 matmul peak is measured before each repeat, and medians of per-repeat
ratios are printed. The first two steps of each variant (compilation included) are timed apart.

    python benchmarks/train_variants.py --batch 64

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from throughput import fp32_peak_flops  # noqa: E402

from kd_lightning.nets import create_net  # noqa: E402

VARIANTS = {"channels-last eager": (True, False), "NCHW eager": (False, False), "channels-last compiled": (True, True)}


def make_step(net_name: str, batch: int, channels_last: bool, compiled: bool):
    net = create_net(net_name, num_classes=10, in_channels=1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.rand(batch, 1, 32, 32).contiguous(memory_format=fmt), torch.randint(0, 10, (batch,))
    fwd = torch.compile(net) if compiled else net

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
    args = p.parse_args()
    torch.manual_seed(0)
    steps = {}
    for name, (cl, comp) in VARIANTS.items():
        steps[name] = make_step(args.net, args.batch, cl, comp)
        t0 = time.perf_counter()
        steps[name]()
        steps[name]()
        print(f"{name}: first two steps {time.perf_counter() - t0:.1f} s", flush=True)
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
    print(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; peaks {[round(x / 1e9, 1) for x in peaks]}")
    for name in VARIANTS:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[base]))
        share = statistics.median(a * args.flops_per_image / pk for a, pk in zip(rates[name], peaks))
        print(f"{name}: {statistics.median(rates[name]):.1f} img/s, ratio {ratio:.2f}, {100 * share:.1f}% of peak")


if __name__ == "__main__":
    main()
