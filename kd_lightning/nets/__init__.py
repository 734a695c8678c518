"""Backbones by name: ``list_nets()``, ``create_net(name, num_classes, in_channels, task)``."""

from kd_lightning.nets import resnet_cifar, tiny, vgg  # noqa: F401  (registration side effects)
from kd_lightning.nets.features import FeatureExtractor, resolve_feature_path
from kd_lightning.nets.registry import NetInfo, create_net, list_nets, net_info, register_net

__all__ = ["FeatureExtractor", "NetInfo", "create_net", "list_nets", "net_info", "register_net", "resolve_feature_path"]
