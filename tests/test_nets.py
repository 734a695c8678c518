"""Every registered net: builds with 1 or 3 input channels, both heads, exact declared features, sizes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.nets import FeatureExtractor, count_macs, count_parameters, create_net, list_nets, net_info

CIFAR_NETS = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    "mobilenetv2", "shufflenetv1", "shufflenetv2", "preact_resnet18", "densenet121_cifar",
]  # fmt: skip
IMAGENET_NETS = ["resnet18", "resnet34", "resnet50", "densenet121", "densenet161", "mobilenet_v2", "shufflenet_v2"]

# Parameters for 100 classes, as reported for RepDistiller's CIFAR models (CRD paper, their code's
# printouts) and for PreAct ResNet-18 / kuangliu's CIFAR DenseNet-121; relative tolerance 3%.
REFERENCE_PARAMS_100 = {
    "resnet8": 0.084e6, "resnet14": 0.18e6, "resnet20": 0.28e6, "resnet32": 0.47e6, "resnet44": 0.67e6,
    "resnet56": 0.86e6, "resnet110": 1.73e6, "resnet8x4": 1.23e6, "resnet32x4": 7.43e6,
    "wrn_16_1": 0.18e6, "wrn_16_2": 0.70e6, "wrn_40_1": 0.57e6, "wrn_40_2": 2.26e6,
    "vgg8": 3.96e6, "vgg11": 9.28e6, "vgg13": 9.46e6, "vgg16": 14.77e6, "vgg19": 20.09e6,
    "mobilenetv2": 0.81e6, "shufflenetv1": 0.95e6, "shufflenetv2": 1.36e6,
    "preact_resnet18": 11.22e6, "densenet121_cifar": 7.05e6,
}  # fmt: skip
# torchvision's published parameter counts for its 1000-class ImageNet models.
REFERENCE_PARAMS_1000 = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "densenet121": 7_978_856,
    "densenet161": 28_681_000, "mobilenet_v2": 3_504_872, "shufflenet_v2": 2_278_604,
}  # fmt: skip

# (channels, stride) of each declared stage, and the penultimate feature size.
EXPECTED_FEATURES: dict[str, tuple[list[tuple[int, int]], int]] = {
    **{f"resnet{d}": ([(16, 1), (32, 2), (64, 4)], 64) for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": ([(64, 1), (128, 2), (256, 4)], 256) for d in (8, 32)},
    "wrn_16_1": ([(16, 1), (32, 2), (64, 4)], 64),
    "wrn_40_1": ([(16, 1), (32, 2), (64, 4)], 64),
    "wrn_16_2": ([(32, 1), (64, 2), (128, 4)], 128),
    "wrn_40_2": ([(32, 1), (64, 2), (128, 4)], 128),
    **{v: ([(128, 2), (256, 4), (512, 8), (512, 16)], 512) for v in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "mobilenetv2": ([(12, 2), (16, 4), (48, 8), (160, 16)], 1280),
    "shufflenetv1": ([(240, 2), (480, 4), (960, 8)], 960),
    "shufflenetv2": ([(116, 2), (232, 4), (464, 8), (1024, 8)], 1024),
    "preact_resnet18": ([(64, 1), (128, 2), (256, 4), (512, 8)], 512),
    "densenet121_cifar": ([(256, 1), (512, 2), (1024, 4), (1024, 8)], 1024),
    "resnet18": ([(64, 4), (128, 8), (256, 16), (512, 32)], 512),
    "resnet34": ([(64, 4), (128, 8), (256, 16), (512, 32)], 512),
    "resnet50": ([(256, 4), (512, 8), (1024, 16), (2048, 32)], 2048),
    "densenet121": ([(256, 4), (512, 8), (1024, 16), (1024, 32)], 1024),
    "densenet161": ([(384, 4), (768, 8), (2112, 16), (2208, 32)], 2208),
    "mobilenet_v2": ([(16, 2), (24, 4), (32, 8), (96, 16), (1280, 32)], 1280),
    "shufflenet_v2": ([(116, 8), (232, 16), (464, 32), (1024, 32)], 1024),
    "tinynet": ([(16, 1), (32, 2)], 32),
}
# nets whose (slow to initialise) default test only checks shapes; backward + 1 channel is a slow test
HEAVY = {"densenet161", "resnet50", "resnet34", "densenet121", "preact_resnet18", "densenet121_cifar", "vgg19"}


def test_every_required_net_is_registered() -> None:
    assert set(CIFAR_NETS + IMAGENET_NETS + ["tinynet"]) <= set(list_nets())
    assert set(EXPECTED_FEATURES) == set(list_nets())  # a new net must declare its expected features here


def _side(name: str) -> int:
    """Smallest input keeping every declared stage at least 1 px (fast tests)."""
    return max(16, max(stride for _, stride in EXPECTED_FEATURES[name][0]))


@pytest.mark.parametrize("name", sorted(EXPECTED_FEATURES))
def test_declared_features_and_head(name: str) -> None:
    info = net_info(name)
    size = _side(name)
    stages, pen_dim = EXPECTED_FEATURES[name]
    net = create_net(name, num_classes=5, in_channels=3).eval()
    names = [f"stage{i}" for i in range(len(info.stages))] + ["penultimate"]
    with torch.no_grad(), FeatureExtractor(net, names) as fx:
        out, feats = fx(torch.rand(2, 3, size, size))
        head = dict(net.named_modules())[info.head]
        assert isinstance(head, nn.Linear) and head.out_features == 5
        assert torch.allclose(head(feats["penultimate"]), out, atol=1e-5)  # penultimate really feeds the head
    assert out.shape == (2, 5)
    assert [tuple(feats[f"stage{i}"].shape) for i in range(len(stages))] == [
        (2, c, size // stride, size // stride) for c, stride in stages
    ]
    assert feats["penultimate"].shape == (2, pen_dim)


def _regression_one_channel(name: str) -> None:
    size = _side(name)
    reg = create_net(name, num_classes=5, in_channels=1, task="regression")
    y = reg(torch.rand(2, 1, size, size))
    assert y.shape == (2, 1)
    y.sum().backward()
    first_conv = next(m for m in reg.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1 and first_conv.weight.grad is not None


@pytest.mark.parametrize("name", sorted(set(EXPECTED_FEATURES) - HEAVY))
def test_regression_head_one_channel(name: str) -> None:
    _regression_one_channel(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_regression_head_one_channel_heavy(name: str) -> None:
    _regression_one_channel(name)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS_100))
def test_cifar_parameter_counts_match_reference(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        n = count_parameters(create_net(name, num_classes=100))
    assert n == pytest.approx(REFERENCE_PARAMS_100[name], rel=0.03)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS_1000))
def test_imagenet_nets_are_torchvision_architectures(name: str) -> None:
    builder = {"shufflenet_v2": "shufflenet_v2_x1_0"}.get(name, name)
    with torch.device("meta"):
        net = create_net(name, num_classes=1000)
        reference = getattr(torchvision.models, builder)(weights=None)
    assert count_parameters(net) == REFERENCE_PARAMS_1000[name]
    # state-dict keys and shapes are torchvision's, so local torchvision weights load strictly
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_feature_depth_order_and_unknown_names() -> None:
    net = create_net("resnet20", num_classes=10)
    with pytest.raises(ConfigError, match="declares 3 stages"):
        FeatureExtractor(net, ["stage3"])
    with pytest.raises(ConfigError, match="does not exist"):
        FeatureExtractor(net, ["layer9"])
    with pytest.raises(ConfigError, match="unknown net"):
        create_net("resnet21")


def test_count_macs_golden() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(1), nn.Linear(8 * 8 * 8, 4))
    assert count_macs(conv, 8) == 8 * 8 * 8 * 3 * 9 + 8 * 8 * 8 * 4
    # RepDistiller's resnet56 is quoted at ~125M multiply-adds on 32x32
    assert count_macs(create_net("resnet56", 100), 32) == pytest.approx(125.8e6, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET_NETS)
def test_imagenet_nets_at_native_resolution(name: str) -> None:
    net = create_net(name, num_classes=10).eval()
    stages, pen = EXPECTED_FEATURES[name]
    with torch.no_grad(), FeatureExtractor(net, ["stage0", "penultimate"]) as fx:
        out, feats = fx(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 10) and feats["penultimate"].shape == (1, pen)
    assert feats["stage0"].shape[-1] == 224 // stages[0][1]
