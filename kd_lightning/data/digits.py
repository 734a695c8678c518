"""scikit-learn's handwritten digits: 1,797 8x8 grey images in 10 classes, always installed."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import ImageDataModule, Split, TensorDataset


class DigitsDataModule(ImageDataModule):
    """The UCI digits bundled with scikit-learn (no files needed; ``root`` is ignored).

    There is no official test split: a fixed, seed-independent 20% stratified hold-out
    (360 images) is the test set, and validation is carved from the remaining 1,437.
    """

    num_classes = 10
    in_channels = 1
    native_size = 8
    mean = (0.3053,)
    std = (0.3760,)
    hflip = False
    TEST_SEED = 1234

    def build_dataset(self, split: Split) -> Dataset:
        from sklearn.datasets import load_digits

        d = load_digits()
        # pixel values are 0..16; stretch to the uint8 range like any other image
        images = torch.as_tensor(d.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
        labels = torch.as_tensor(d.target, dtype=torch.int64)
        g = torch.Generator().manual_seed(self.TEST_SEED)
        test_mask = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            idx = (labels == c).nonzero().flatten()
            test_mask[idx[torch.randperm(len(idx), generator=g)[: len(idx) // 5]]] = True
        keep = test_mask if split == "test" else ~test_mask
        return TensorDataset(images[keep], labels[keep])
