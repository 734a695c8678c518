"""Per-channel input normalisation stored with the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.errors import ConfigError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics stored as buffers in the checkpoint."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], in_channels: int) -> None:
        super().__init__()
        mean_t, std_t = torch.tensor(list(mean), dtype=torch.float32), torch.tensor(list(std), dtype=torch.float32)
        if len(mean_t) != len(std_t) or len(mean_t) not in (1, in_channels):
            raise ConfigError(
                f"mean={list(mean)} / std={list(std)}: expected 1 or in_channels={in_channels} values each"
            )
        if (std_t <= 0).any():
            raise ConfigError(f"std={list(std)}: every value must be positive")
        self.register_buffer("mean", mean_t.expand(in_channels).reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std_t.expand(in_channels).reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
