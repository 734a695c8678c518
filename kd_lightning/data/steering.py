"""Steering Angle (Sully Chen's driving dataset, the cGAN-KD / CcGAN regression benchmark).

Layout: the images and an angle file, as in the public ``driving_dataset``::

    <root>/data.txt        "<image file> <angle in degrees>" per line (a ",<timestamp>" suffix
                           after the angle, as in the 2018 release, is ignored)
    <root>/<image file>    e.g. 0.jpg, 1.jpg, ... (any relative path)

``angle_file`` names another file, and ``image_dir`` a sub-folder holding the images. Images are
resized to 64x64. Following cGAN-KD, the angle range is cut into disjoint intervals of at least
``min_per_interval`` images and 20% of every interval is held out for testing (a fixed split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split
from kd_lightning.data.image_files import ImageFileDataset, grouped_holdout, require_file
from kd_lightning.errors import ConfigError, DataNotFoundError


def angle_intervals(angles: torch.Tensor, min_count: int) -> torch.Tensor:
    """Interval id per sample: consecutive sorted angles grouped until each group has >= min_count.

    Equal angles never straddle two intervals; a short last group joins the previous one.
    """
    order = torch.argsort(angles, stable=True)
    group = torch.zeros(len(angles), dtype=torch.int64)
    gid, count = 0, 0
    for k, i in enumerate(order.tolist()):
        if count >= min_count and angles[i] != angles[order[k - 1]]:
            gid, count = gid + 1, 0
        group[i] = gid
        count += 1
    if gid > 0 and count < min_count:
        group[group == gid] = gid - 1
    return group


class SteeringAngleDataModule(ImageDataModule):
    """Steering angle (degrees) from 64x64 dash-cam frames; labels normalised over ``[min_angle, max_angle]``.

    Args:
        root: folder with the angle file and the images.
        angle_file: name of the angle file under ``root``.
        image_dir: folder of the images, relative to ``root`` (``""``: next to the angle file).
        min_angle: smallest angle kept (degrees); frames outside the range are dropped.
        max_angle: largest angle kept (degrees).
        min_per_interval: images per angle interval of the stratified test split.
        test_fraction: share of every interval held out as the test set.
        verify: decode every image once at setup.
        **kwargs: see :class:`~kd_lightning.data.ImageDataModule`.
    """

    task = "regression"
    native_size = 64
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    hflip = False  # a mirrored frame would need the opposite angle
    label_range = (-88.13, 97.92)
    SPLIT_SEED = 2021

    def __init__(
        self,
        root: str | None = None,
        angle_file: str = "data.txt",
        image_dir: str = "",
        min_angle: float = -88.13,
        max_angle: float = 97.92,
        min_per_interval: int = 40,
        test_fraction: float = 0.2,
        verify: bool = False,
        **kwargs: Any,
    ) -> None:
        if not min_angle < max_angle:
            raise ConfigError(f"min_angle={min_angle}, max_angle={max_angle}; expected min_angle < max_angle")
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction={test_fraction}; expected a number in (0, 1)")
        super().__init__(root=root, **kwargs)
        self.angle_file, self.image_dir = angle_file, image_dir
        self.min_per_interval, self.test_fraction, self.verify = max(1, min_per_interval), test_fraction, verify
        self.label_range = (float(min_angle), float(max_angle))

    def scan(self) -> tuple[list[Path], torch.Tensor]:
        """Image paths and angles listed in the angle file (within the angle range)."""
        if self.root is None:
            raise DataNotFoundError(f"{type(self).__name__} needs root=<folder with {self.angle_file} and the images>")
        root = Path(self.root)
        ann = require_file(root / self.angle_file, "Steering Angle angle file")
        lo, hi = self.label_range
        paths, angles = [], []
        for n, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            try:
                angle = float(parts[1].split(",")[0])
            except (IndexError, ValueError):
                raise DataNotFoundError(f"{ann}:{n}: {line!r}; expected '<image file> <angle in degrees>'") from None
            if lo <= angle <= hi:
                paths.append(root / self.image_dir / parts[0])
                angles.append(angle)
        if not paths:
            raise DataNotFoundError(f"{ann} lists no image with an angle in [{lo}, {hi}]")
        return paths, torch.tensor(angles, dtype=torch.float32)

    def build_dataset(self, split: Split) -> Dataset:
        paths, angles = self.scan()
        test = grouped_holdout(angle_intervals(angles, self.min_per_interval), self.test_fraction, self.SPLIT_SEED)
        idx = (test if split == "test" else ~test).nonzero().flatten().tolist()
        return ImageFileDataset([paths[i] for i in idx], angles[idx], size=self.native_size, verify=self.verify)
