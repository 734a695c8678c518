"""Registry of backbones by name.

A net is a plain ``nn.Module`` built by a factory ``fn(num_classes, in_channels, task) -> nn.Module``.
Every net declares the module paths of its stage outputs and of its penultimate (pre-logit)
feature in ``FEATURES``; :class:`~kd_lightning.nets.features.FeatureExtractor` reads them with
forward hooks, so feature distillation never edits a network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from kd_lightning.errors import ConfigError

Task = Literal["classification", "regression"]
TASKS: tuple[str, ...] = ("classification", "regression")


@dataclass(frozen=True)
class NetInfo:
    """What the registry knows about one net.

    ``stages`` are module paths (as in ``named_modules``) of the outputs of each stage, shallow to
    deep; ``penultimate`` is the path of the module whose output is the pooled, flattened feature
    that feeds the head; ``head`` is the path of the final linear layer.
    """

    name: str
    factory: Callable[..., nn.Module]
    stages: tuple[str, ...] = ()
    penultimate: str = ""
    head: str = "fc"
    native_size: int = 32
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, NetInfo] = {}


def register_net(
    name: str,
    *,
    stages: tuple[str, ...] = (),
    penultimate: str = "",
    head: str = "fc",
    native_size: int = 32,
    tags: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a factory ``fn(num_classes, in_channels) -> nn.Module``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"net {name!r} is registered twice")
        _REGISTRY[name] = NetInfo(name, fn, tuple(stages), penultimate, head, native_size, tuple(tags))
        return fn

    return wrap


def list_nets() -> list[str]:
    """Names of every registered net, sorted."""
    return sorted(_REGISTRY)


def net_info(name: str) -> NetInfo:
    """The :class:`NetInfo` of ``name``; a clear error lists the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown net {name!r}; expected one of: {', '.join(list_nets())}") from None


def create_net(name: str, num_classes: int = 10, in_channels: int = 3, task: Task = "classification") -> nn.Module:
    """Build net ``name``.

    With ``task="regression"`` the head outputs one scalar per image (``num_classes`` is ignored).
    The returned module carries ``net_info`` (its :class:`NetInfo`) as an attribute.
    """
    info = net_info(name)
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not supported; expected one of {TASKS}")
    if task == "classification" and (not isinstance(num_classes, int) or num_classes < 2):
        raise ConfigError(f"num_classes={num_classes!r} for net {name!r}; expected an integer >= 2")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels={in_channels!r} for net {name!r}; expected an integer >= 1")
    out = 1 if task == "regression" else num_classes
    net = info.factory(num_classes=out, in_channels=in_channels)
    net.net_info = info  # type: ignore[assignment]  # nn.Module types attributes as Tensor | Module
    return net


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters of ``net``."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def count_macs(net: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a single ``in_channels x image_size^2`` image.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products;
    it reports 2 FLOPs per multiply-add, halved here), in eval mode without gradients.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, in_channels, image_size, image_size))
    net.train(was_training)
    return counter.get_total_flops() // 2
