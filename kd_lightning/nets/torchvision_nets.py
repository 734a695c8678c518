"""ImageNet-style backbones from torchvision (64-224 px inputs), randomly initialised.

Each is torchvision's own architecture (``weights=None``; nothing is ever downloaded — load a local
``state_dict`` with ``NetTask(net_weights=...)``, whose keys match torchvision's). Two changes only:
the first conv takes ``in_channels`` channels, and the pooled feature passes through a parameter-free
``flatten`` module so feature KD can hook the penultimate feature by name. State-dict keys are
unchanged, so torchvision checkpoints with a matching head load directly.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from kd_lightning.nets.registry import register_net


def _swap_first_conv(parent: nn.Module, attr: str, in_channels: int) -> None:
    """Replace ``parent.<attr>`` (a Conv2d on 3 channels) by the same conv on ``in_channels``."""
    old = parent.get_submodule(attr)  # a digit is the child's name in an nn.Sequential
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"expected a Conv2d at {attr!r} of {type(parent).__name__}, got {type(old).__name__}")
    if in_channels == old.in_channels:
        return
    pair = tuple[int, int]  # a Conv2d stores its sizes as 2-tuples (padding: or a mode string)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        cast(pair, old.kernel_size),
        cast(pair, old.stride),
        cast("str | pair", old.padding),
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    setattr(parent, attr, new)  # replaces the child in place: the state_dict key order is unchanged


class TVResNet(tvm.ResNet):
    """torchvision ResNet whose pooled feature is the output of ``flatten``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flatten = nn.Flatten(1)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


class TVDenseNet(tvm.DenseNet):
    """torchvision DenseNet whose final ReLU, pooling and flattening are named modules."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.relu(self.features(x)))))


class TVMobileNetV2(tvm.MobileNetV2):
    """torchvision MobileNetV2 with named ``avgpool`` and ``flatten``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


class TVShuffleNetV2(tvm.ShuffleNetV2):
    """torchvision ShuffleNetV2 with named ``avgpool`` and ``flatten``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x))))))
        return self.fc(self.flatten(self.avgpool(x)))


_RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
_DENSENETS = {"densenet121": (32, (6, 12, 24, 16), 64), "densenet161": (48, (6, 12, 36, 24), 96)}


class _NetMeta(TypedDict):
    native_size: int
    tags: tuple[str, ...]


_IMAGENET: _NetMeta = {"native_size": 224, "tags": ("imagenet", "torchvision")}


def _register_resnet(name: str) -> None:
    @register_net(name, stages=("layer1", "layer2", "layer3", "layer4"), penultimate="flatten", head="fc", **_IMAGENET)
    def _factory(num_classes: int, in_channels: int = 3) -> nn.Module:
        block, layers = _RESNETS[name]
        net = TVResNet(block, layers, num_classes=num_classes)
        _swap_first_conv(net, "conv1", in_channels)
        return net


def _register_densenet(name: str) -> None:
    stages = tuple(f"features.denseblock{i}" for i in range(1, 5))

    @register_net(name, stages=stages, penultimate="flatten", head="classifier", **_IMAGENET)
    def _factory(num_classes: int, in_channels: int = 3) -> nn.Module:
        growth, blocks, init = _DENSENETS[name]
        net = TVDenseNet(growth_rate=growth, block_config=blocks, num_init_features=init, num_classes=num_classes)
        _swap_first_conv(net.features, "conv0", in_channels)
        return net


for _name in _RESNETS:
    _register_resnet(_name)
for _name in _DENSENETS:
    _register_densenet(_name)


# stage outputs at strides 2, 4, 8, 16, 32 (the last block of each resolution, then the 1x1 conv)
@register_net(
    "mobilenet_v2",
    stages=("features.1", "features.3", "features.6", "features.13", "features.18"),
    penultimate="flatten",
    head="classifier.1",
    **_IMAGENET,
)
def mobilenet_v2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build torchvision's MobileNetV2 with an ``in_channels`` first convolution."""
    net = TVMobileNetV2(num_classes=num_classes)
    _swap_first_conv(net.features[0], "0", in_channels)
    return net


@register_net(
    "shufflenet_v2", stages=("stage2", "stage3", "stage4", "conv5"), penultimate="flatten", head="fc", **_IMAGENET
)
def shufflenet_v2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build torchvision's ShuffleNetV2 (x1.0 widths) with an ``in_channels`` first convolution."""
    net = TVShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
    _swap_first_conv(net.conv1, "0", in_channels)
    return net
