"""BatchNorm folding for frozen nets: equal outputs on every zoo family with conv+BN, never on a training net,
never in a state_dict or a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.nets import create_net
from kd_lightning.nets.fold import fold_bn
from kd_lightning.nets.normalize import Normalize
from kd_lightning.teachers import FrozenTeacher

# one (small) net of every zoo family that has conv -> BN pairs, with the input side it takes; pre-activation
# families (WRN, PreAct ResNet, DenseNet) have fewer pairs: their conv -> BN inside a block
FAMILIES = {
    "resnet8": 32,  # CIFAR ResNet
    "resnet8x4": 32,
    "wrn_16_1": 32,
    "vgg8": 32,
    "mobilenetv2": 32,
    "shufflenetv1": 32,
    "shufflenetv2": 32,
    "preact_resnet18": 32,
    "densenet121_cifar": 32,
    "tinynet": 16,
    "resnet18": 64,  # torchvision
    "mobilenet_v2": 64,
    "shufflenet_v2": 64,
    "densenet121": 64,
}


def trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (folding with the defaults would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
    return net.eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_folded_equals_unfolded(name: str) -> None:
    torch.manual_seed(0)
    net = trained_like(create_net(name, num_classes=10, in_channels=3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded, pairs = fold_bn(net)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    n_left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert len(pairs) > 0 and n_left == n_bn - len(pairs)
    x = torch.rand(3, 3, FAMILIES[name], FAMILIES[name])
    with torch.no_grad():
        ref, out = net(x), folded(x)
    scale = float(ref.abs().max().clamp(min=1))
    assert float((ref - out).abs().max()) <= 1e-5 * scale
    # the source net is untouched: same keys, same values, its BatchNorms still there
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_fold_values_by_hand() -> None:
    """One conv + BN: the folded weights are w * g / sqrt(v + eps) and (b - m) * g / sqrt(v + eps) + beta."""
    conv, bn = nn.Conv2d(2, 3, 3, padding=1, bias=True), nn.BatchNorm2d(3, eps=0.01)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    seq = nn.Sequential(conv, bn).eval()
    folded, pairs = fold_bn(seq)
    assert pairs == [("0", "1")] and isinstance(folded[1], nn.Identity)
    s = torch.tensor([1.0, 2.0, -1.0]) / torch.sqrt(torch.tensor([4.0, 0.25, 1.0]) + 0.01)
    assert torch.allclose(folded[0].weight, conv.weight * s.view(3, 1, 1, 1))
    assert torch.allclose(
        folded[0].bias, (conv.bias - torch.tensor([0.5, -1.0, 2.0])) * s + torch.tensor([0.1, 0.2, 0.3])
    )


def test_no_fold_when_conv_output_is_used_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # the raw conv output is needed too: folding would change it

    net = trained_like(Twice())
    folded, pairs = fold_bn(net)
    assert pairs == []
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(net(x), folded(x))


def test_training_net_is_refused() -> None:
    net = create_net("resnet8", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="eval mode"):
        fold_bn(net.train())


def test_frozen_teacher_folds_only_its_inference_copy(tmp_path) -> None:
    torch.manual_seed(0)
    net = trained_like(create_net("resnet8", num_classes=10, in_channels=1))
    plain = FrozenTeacher(net, Normalize((0.3,), (0.4,), 1), "classification", 10, "resnet8")
    fast = FrozenTeacher(
        trained_like(create_net("resnet8", num_classes=10, in_channels=1)),
        Normalize((0.3,), (0.4,), 1),
        "classification",
        10,
        "resnet8",
        fold_bn=True,
    )
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(5, 1, 32, 32)
    ref = plain(x)
    assert float((fast(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max().clamp(min=1))
    assert fast.inference_net() is not fast.net  # inference ran on the folded copy...
    # ...which is in no state_dict: the keys (BatchNorm buffers included) and values are the unfolded net's
    state = fast.state_dict()
    assert state.keys() == plain.state_dict().keys() and any(k.endswith("bn1.running_var") for k in state)
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    torch.save(fast.state_dict(), tmp_path / "t.pt")
    saved = torch.load(tmp_path / "t.pt")
    assert all(torch.equal(saved[k], v) for k, v in plain.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.net.modules())
    # features: an alias gives the folded (equal) value; a folded conv's own path falls back to the unfolded net
    _, f_fast = fast.forward_features(x, ["penultimate", "conv1"])
    _, f_ref = plain.forward_features(x, ["penultimate", "conv1"])
    assert torch.equal(f_fast["conv1"], f_ref["conv1"])
    assert torch.allclose(f_fast["penultimate"], f_ref["penultimate"], atol=1e-5)
    # new weights are seen: the folded copy is rebuilt
    other = trained_like(create_net("resnet8", num_classes=10, in_channels=1), seed=1)
    fast.net.load_state_dict(other.state_dict())
    plain.net.load_state_dict(other.state_dict())
    ref2 = plain(x)
    assert not torch.allclose(ref2, ref)
    assert float((fast(x) - ref2).abs().max()) <= 1e-5 * float(ref2.abs().max().clamp(min=1))
