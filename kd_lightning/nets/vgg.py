"""VGG with batch norm for small images, as sized in RepDistiller's CIFAR benchmarks.

Five convolutional blocks separated by 2x2 max pooling, global average pooling, a linear head.
``vgg8`` has one conv per block; vgg11/13/16/19 follow the classic configurations.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets.registry import register_net

_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(in_ch: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_ch = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-BN: ``block0`` .. ``block4`` with max pooling between them (pooling skipped below 2 px)."""

    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        chans = [in_channels] + [c[-1] for c in cfg]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (_block(chans[i], cfg[i]) for i in range(5))
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(chans[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                assert m.bias is not None  # every conv here has a bias
                nn.init.zeros_(m.bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) if min(x.shape[-2:]) >= 2 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pool(self.block0(x))
        x = self._pool(self.block1(x))
        x = self._pool(self.block2(x))
        x = self._pool(self.block3(x))
        x = self.block4(x)
        return self.fc(self.flatten(self.avgpool(x)))


def _register(name: str) -> None:
    @register_net(name, stages=("block1", "block2", "block3", "block4"), penultimate="flatten", tags=("cifar",))
    def _factory(num_classes: int, in_channels: int = 3) -> nn.Module:
        return VGG(_CFGS[name], num_classes, in_channels)


for _name in _CFGS:
    _register(_name)
