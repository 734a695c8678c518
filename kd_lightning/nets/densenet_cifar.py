"""DenseNet-121 for 32x32 images (Huang et al. 2017), the CIFAR teacher of cGAN-KD / AI-KD (~7.0M).

Bottleneck dense layers (BN-ReLU-1x1 to 4k, BN-ReLU-3x3 to k, growth k = 32), blocks of 6/12/24/16
layers with compression-0.5 transitions; a 3x3 stem of 2k channels without pooling (the CIFAR
change from the ImageNet model, registered separately as ``densenet121``).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); output is the input with k new channels appended."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.body(x), x], 1)


def _transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2)
    )


class DenseNetCifar(nn.Module):
    """Stem ``conv1``, blocks ``dense1..dense4`` with ``trans1..trans3`` between, ``bn``-ReLU, ``flatten``, ``fc``."""

    # registered by name in __init__ (add_module)
    dense1: nn.Module
    dense2: nn.Module
    dense3: nn.Module
    dense4: nn.Module
    trans1: nn.Module
    trans2: nn.Module
    trans3: nn.Module

    def __init__(self, blocks: tuple[int, ...], growth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        c = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        for i, n in enumerate(blocks, start=1):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            self.add_module(f"dense{i}", nn.Sequential(*layers))
            if i < len(blocks):
                self.add_module(f"trans{i}", _transition(c, c // 2))
                c //= 2
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans1(self.dense1(self.conv1(x)))
        x = self.trans3(self.dense3(self.trans2(self.dense2(x))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(self.dense4(x))))))


@register_net(
    "densenet121_cifar", stages=("dense1", "dense2", "dense3", "dense4"), penultimate="flatten", tags=("cifar",)
)
def densenet121_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build DenseNet-121 (growth rate 32) for 32x32 inputs."""
    return DenseNetCifar((6, 12, 24, 16), 32, num_classes, in_channels)
