"""Intermediate features by module path, taken with forward hooks (no edits to the net)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from kd_lightning.errors import ConfigError


class FeatureExtractor:
    """Record the outputs of named submodules of ``net`` on every forward pass.

    ``names`` are module paths as in ``net.named_modules()``; the aliases ``"stage{i}"`` (i-th
    declared stage, from 0) and ``"penultimate"`` resolve through the net's registry entry, and
    ``"prepool"`` is the *input* of the global pooling that makes the penultimate feature (the last
    C x H x W map the head sees; a forward pre-hook on the ``avgpool`` beside it). After a
    forward pass, :attr:`features` maps each requested name to its output. Use :meth:`close` (or a
    ``with`` block) to remove the hooks.
    """

    def __init__(self, net: nn.Module, names: Sequence[str]) -> None:
        self.net = net
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(net.named_modules())
        self._handles = []
        for name in self.names:
            path = resolve_feature_path(net, name)
            if path not in modules:
                raise ConfigError(f"feature {name!r} -> module path {path!r} does not exist in {type(net).__name__}")
            if name == PREPOOL:
                self._handles.append(modules[path].register_forward_pre_hook(self._pre_hook(name)))
            else:
                self._handles.append(modules[path].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inp: object, out: torch.Tensor) -> None:
            self.features[name] = out

        return hook

    def _pre_hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.features[name] = args[0]

        return hook

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the net and return ``(output, features)``."""
        self.features = {}
        out = self.net(x)
        return out, dict(self.features)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: alias of the map fed to the global pooling (read with a pre-hook on the pooling module)
PREPOOL = "prepool"
#: alias of the feature the classifier head reads
PENULTIMATE = "penultimate"


def stage_name(i: int) -> str:
    """The alias of a net's i-th declared stage."""
    return f"stage{i}"


def stage_index(name: str) -> int | None:
    """``i`` for the alias ``stage{i}``; None for any other name."""
    return int(name[5:]) if name.startswith("stage") and name[5:].isdigit() else None


def stage_names(names: Iterable[str]) -> list[str]:
    """The ``stage{i}`` aliases among ``names``, shallow to deep."""
    return sorted((n for n in names if stage_index(n) is not None), key=lambda n: stage_index(n) or 0)


def resolve_feature_path(net: nn.Module, name: str) -> str:
    """Map ``stage{i}`` / ``penultimate`` / ``prepool`` aliases to module paths; other names pass through."""
    info = getattr(net, "net_info", None)
    if info is None:
        return name
    if name == PENULTIMATE:
        return info.penultimate
    if name == PREPOOL:
        parent = info.penultimate.rpartition(".")[0]
        return f"{parent}.avgpool" if parent else "avgpool"
    i = stage_index(name)
    if i is not None:
        if i >= len(info.stages):
            raise ConfigError(f"feature {name!r}: net {info.name!r} declares {len(info.stages)} stages {info.stages}")
        return info.stages[i]
    return name
