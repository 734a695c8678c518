"""CIFAR-style ResNets (He et al. 2016, section 4.2) as sized in RepDistiller's benchmarks.

``resnet{6n+2}`` has three stages of ``n`` basic blocks with 16/32/64 channels (the ``x4``
variants use 32/64/128/256 channels with a 32-channel stem); a 3x3 stem without pooling, global
average pooling and a linear head. Works for any input size >= 8 px.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: stem, ``len(widths) - 1`` stages, pooled feature, linear head."""

    def __init__(self, depth: int, widths: tuple[int, ...], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth}: a CIFAR ResNet needs depth = 6n + 2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages[:3]
        self.layer4 = stages[3] if len(stages) > 3 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


_STAGES = ("layer1", "layer2", "layer3")


def _register(depth: int, widths: tuple[int, ...], suffix: str = "") -> None:
    name = f"resnet{depth}{suffix}"

    @register_net(name, stages=_STAGES, penultimate="flatten", tags=("cifar",))
    def _factory(num_classes: int, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, widths, num_classes, in_channels)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register(_depth, (32, 64, 128, 256), suffix="x4")
