"""MobileNetV2 for 32x32 images at half width (RepDistiller's ``mobile_half``; ~0.8M parameters).

Inverted residual blocks (Sandler et al. 2018) with expansion 6 and width multiplier 0.5; the
stem has stride 2, so a 32x32 image ends at 2x2 before the 1280-channel 1x1 conv and pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net

# expansion t, output channels c, repeats n, first stride s (the original MobileNetV2 table)
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, mid, 1), *_conv_bn(mid, mid, 3, stride, groups=mid), *_conv_bn(mid, cout, 1, relu=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem ``conv1``, seven groups ``blocks.0..6``, 1x1 ``conv2``, pooled ``flatten``, head ``fc``."""

    def __init__(self, num_classes: int, in_channels: int = 3, expand: int = 6, width: float = 0.5) -> None:
        super().__init__()
        cin = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn(in_channels, cin, 3, stride=2))
        blocks = []
        for t, c, n, s in _SETTING:
            cout = int(c * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand if t != 1 else 1))
                cin = cout
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.conv2 = nn.Sequential(*_conv_bn(cin, 1280, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.flatten(self.avgpool(self.conv2(x))))


@register_net(
    "mobilenetv2", stages=("blocks.1", "blocks.2", "blocks.4", "blocks.6"), penultimate="flatten", tags=("cifar",)
)
def mobilenetv2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build MobileNetV2 for 32x32 inputs."""
    return MobileNetV2(num_classes, in_channels)
