"""Pre-activation ResNet-18 for 32x32 images (He et al. 2016, "Identity mappings"), ~11.2M parameters.

The CIFAR variant used by the self-KD papers (CS-KD, PS-KD, AI-KD): a 3x3 64-channel stem without
pooling, four stages of two pre-activation basic blocks (64/128/256/512 channels), a final
BN-ReLU, global average pooling and a linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the projection shortcut takes the activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        res = x if self.shortcut is None else self.shortcut(act)
        return self.conv2(self.relu(self.bn2(self.conv1(act)))) + res


class PreActResNet(nn.Module):
    """Stem ``conv1``, stages ``layer1..layer4``, ``bn``-ReLU, pooled ``flatten``, head ``fc``."""

    def __init__(self, depths: tuple[int, ...], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        cin, stages = 64, []
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(depth):
                blocks.append(PreActBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(x)))))


@register_net(
    "preact_resnet18", stages=("layer1", "layer2", "layer3", "layer4"), penultimate="flatten", tags=("cifar",)
)
def preact_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the pre-activation ResNet-18."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)
