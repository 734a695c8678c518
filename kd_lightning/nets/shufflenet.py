"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) for 32x32 images.

Sized like RepDistiller's CIFAR ``ShuffleV1`` (groups 3, 240/480/960 channels, ~0.95M parameters
for 100 classes) and ``ShuffleV2`` (116/232/464 channels, 1024-channel last conv, ~1.4M): a 1x1
24-channel stem without pooling, three stride-2 stages, global average pooling, a linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups (N, g*c, H, W) -> (N, c*g, H, W)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise (stride), grouped 1x1; add, or concat with avg-pooled input."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first: bool) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 4
        self.groups = 1 if first else groups  # the 24-channel stem is too narrow to split
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.relu(self.bn1(self.conv1(x))), self.groups)
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """Stem ``conv1``, stages ``layer1..layer3``, pooled ``flatten``, head ``fc``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        groups: int = 3,
        widths: tuple[int, ...] = (240, 480, 960),
        depths: tuple[int, ...] = (4, 8, 4),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        cin = 24
        layers = []
        for width, depth in zip(widths, depths):
            blocks = []
            for i in range(depth):
                # the first block of a stage concatenates its pooled input, so it produces width - cin channels
                blocks.append(
                    ShuffleV1Block(cin, width - cin if i == 0 else width, 2 if i == 0 else 1, groups, cin == 24)
                )
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


class ShuffleV2Block(nn.Module):
    """Channel split; one half through 1x1-dw3x3-1x1; concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: both branches downsample the full input; concat; shuffle."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.right = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(nn.Module):
    """Stem ``conv1``, stages ``layer1..layer3``, 1x1 ``conv2``, pooled ``flatten``, head ``fc``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, ...] = (116, 232, 464),
        depths: tuple[int, ...] = (3, 7, 3),
        last: int = 1024,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        cin = 24
        layers = []
        for width, depth in zip(widths, depths):
            layers.append(nn.Sequential(ShuffleV2Down(cin, width), *[ShuffleV2Block(width) for _ in range(depth)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.fc(self.flatten(self.avgpool(x)))


@register_net("shufflenetv1", stages=("layer1", "layer2", "layer3"), penultimate="flatten", tags=("cifar",))
def shufflenetv1(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build ShuffleNetV1 for 32x32 inputs."""
    return ShuffleNetV1(num_classes, in_channels)


@register_net("shufflenetv2", stages=("layer1", "layer2", "layer3", "conv2"), penultimate="flatten", tags=("cifar",))
def shufflenetv2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build ShuffleNetV2 for 32x32 inputs."""
    return ShuffleNetV2(num_classes, in_channels)
