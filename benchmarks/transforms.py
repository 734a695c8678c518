"""Per-sample training transform: torchvision's v2 pipeline vs the DataModules' uint8 fast path (bitwise equal),
alternated in one process; medians of per-repeat ratios.

    python benchmarks/transforms.py      # Fashion-MNIST-like 1x28x28 -> pad to 32, random crop, flip

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lightning.data.base import ImageDataModule


class Fake(ImageDataModule):
    num_classes, in_channels, native_size = 10, 1, 28


def per_second(fn, images: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for im in images:
        fn(im)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    fast = Fake(image_size=32, augment=True).train_transform()
    images = torch.randint(0, 256, (2000, 1, 28, 28), dtype=torch.uint8)
    rates: dict[str, list[float]] = {"v2": [], "fast": []}
    for _ in range(5):
        rates["v2"].append(per_second(fast.pipeline, images))
        rates["fast"].append(per_second(fast, images))
    ratio = statistics.median(f / v for f, v in zip(rates["fast"], rates["v2"]))
    load = os.getloadavg()
    print(
        f"v2 {statistics.median(rates['v2']):.0f} images/s, fast path {statistics.median(rates['fast']):.0f} images/s, "
        f"median ratio {ratio:.2f} (5 alternated repeats of 2000 images; load average {load[0]:.2f})"
    )


if __name__ == "__main__":
    main()
