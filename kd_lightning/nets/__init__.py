"""Backbones by name: ``list_nets()``, ``create_net(name, num_classes, in_channels, task)``.

CIFAR-style nets (32x32, tag ``"cifar"``) follow RepDistiller's sizes; ImageNet-style nets (tag
``"imagenet"``, 64-224 px) are torchvision's architectures. ``list_nets()`` names them all.
"""

from kd_lightning.nets import (  # noqa: F401  (registration side effects)
    densenet_cifar,
    mobilenetv2,
    preact_resnet,
    resnet_cifar,
    shufflenet,
    tiny,
    torchvision_nets,
    vgg,
    wrn,
)
from kd_lightning.nets.features import FeatureExtractor, resolve_feature_path
from kd_lightning.nets.registry import (
    NetInfo,
    count_macs,
    count_parameters,
    create_net,
    list_nets,
    net_info,
    register_net,
)

__all__ = [
    "FeatureExtractor",
    "NetInfo",
    "count_macs",
    "count_parameters",
    "create_net",
    "list_nets",
    "net_info",
    "register_net",
    "resolve_feature_path",
]
