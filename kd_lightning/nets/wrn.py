"""Wide ResNets (Zagoruyko & Komodakis 2016) for 32x32 images, as sized in RepDistiller's benchmarks.

``wrn_{depth}_{k}`` has three groups of ``(depth - 4) / 6`` pre-activation basic blocks with
``16k / 32k / 64k`` channels after a 16-channel 3x3 stem; a final BN-ReLU, global average pooling
and a linear head (wrn_40_2: ~2.2M parameters for 100 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with identity (or 1x1 projection of the activated input)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """Stem ``conv1``, groups ``block1..block3``, ``bn1``-ReLU, pooled feature ``flatten``, head ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth}: a wide ResNet needs depth = 6n + 4")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)

        def group(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

        self.block1 = group(widths[0], widths[1], 1)
        self.block2 = group(widths[1], widths[2], 2)
        self.block3 = group(widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn1(x)))))


def _register(depth: int, widen: int) -> None:
    @register_net(f"wrn_{depth}_{widen}", stages=("block1", "block2", "block3"), penultimate="flatten", tags=("cifar",))
    def _factory(num_classes: int, in_channels: int = 3) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
