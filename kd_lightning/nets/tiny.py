"""A two-stage convolutional net of a few thousand parameters, for tests and quick examples."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net


class TinyNet(nn.Module):
    """conv(16)-BN-ReLU-pool, conv(32)-BN-ReLU, global average pool, linear head."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.pool = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.stage2(self.pool(self.stage1(x))))))


@register_net("tinynet", stages=("stage1", "stage2"), penultimate="flatten", tags=("test",))
def tinynet(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the tiny test network."""
    return TinyNet(num_classes, in_channels)
