"""Per-sample training transform: torchvision's v2 pipeline vs the DataModules' uint8 fast path (bitwise equal),
alternated in one process; medians of per-repeat ratios.

    python -m benchmarks.transforms      # Fashion-MNIST-like 1x28x28 -> pad to 32, random crop, flip

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch

from benchmarks.common import seconds_per_call
from kd_lightning.data.base import ImageDataModule


class Fake(ImageDataModule):
    num_classes, in_channels, native_size = 10, 1, 28


def per_second(fn: Callable[[torch.Tensor], object], images: torch.Tensor) -> float:
    """Images/s of ``fn`` applied to each of ``images`` in turn."""
    return len(images) / seconds_per_call(lambda: [fn(im) for im in images], min_seconds=0.2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="1x28x28 uint8 images per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="alternated repeats")
    args = p.parse_args(argv)
    fast = Fake(image_size=32, augment=True).train_transform()
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8)
    rates: dict[str, list[float]] = {"v2": [], "fast": []}
    for _ in range(args.repeats):
        rates["v2"].append(per_second(fast.pipeline, images))
        rates["fast"].append(per_second(fast, images))
    ratio = statistics.median(f / v for f, v in zip(rates["fast"], rates["v2"]))
    load = os.getloadavg()
    print(
        f"v2 {statistics.median(rates['v2']):.0f} images/s, fast path {statistics.median(rates['fast']):.0f} images/s, "
        f"median ratio {ratio:.2f} ({args.repeats} alternated repeats of {args.images} images; load average "
        f"{load[0]:.2f})"
    )


if __name__ == "__main__":
    main()
