"""BatchNorm folded into the convolution before it, for frozen (eval-only) copies of a net.

In eval mode ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` (per output channel) and
``b' = (b - m) * g / sqrt(v + eps) + beta``: one memory pass less per layer. :func:`fold_bn` returns a
folded *copy* with the same module paths (each folded BatchNorm becomes an ``nn.Identity``, so a hook on
its path still sees the conv+BN output), and refuses a net in training mode: a training net or the
weights saved in a checkpoint are never folded.

Which conv feeds which BatchNorm is read from the net's graph (``torch.fx``), never guessed from module
order: a BN is folded only when its input is the output of a convolution that nothing else uses.
Pre-activation blocks (BN -> ReLU -> conv) have no such pair and keep their BatchNorms; a module that
``torch.fx`` cannot trace is searched child by child (a child fx cannot trace either keeps its BatchNorms).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.node import Target
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_bn_pairs(net: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """``(conv path, bn path)`` of every BatchNorm whose only input is a conv used by nothing else.

    A module whose ``forward`` fx cannot trace (data-dependent Python) is searched child by child.
    """
    import torch.fx

    try:
        graph = torch.fx.Tracer().trace(net)
    except Exception:  # noqa: BLE001 - look inside the children instead
        return [pair for name, child in net.named_children() for pair in conv_bn_pairs(child, f"{prefix}{name}.")]
    modules = dict(net.named_modules())
    calls: dict[Target, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS) or len(node.args) != 1:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if (
            isinstance(conv, _CONVS)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
            and bn.track_running_stats
            and bn.running_mean is not None
            and conv.out_channels == bn.num_features
        ):
            pairs.append((f"{prefix}{src.target}", f"{prefix}{node.target}"))
    return pairs


@torch.no_grad()
def fold_conv_bn(conv: _ConvNd, bn: _BatchNorm) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place (``conv`` gains a bias if it had none)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError(f"fold_conv_bn needs a BatchNorm with running statistics; {bn} has none")
    scale = bn.weight / torch.sqrt(var + bn.eps) if bn.affine else 1 / torch.sqrt(var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight = nn.Parameter(weight.contiguous(memory_format=_format_of(conv.weight)), requires_grad=False)
    conv.bias = nn.Parameter((bias - mean) * scale + shift, requires_grad=False)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def fold_bn(net: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A folded eval-mode copy of ``net`` and the ``(conv, bn)`` paths that were folded.

    ``net`` itself is not changed. Raises ``ValueError`` when ``net`` is in training mode (folding uses the
    running statistics, which training would still change).
    """
    if net.training:
        raise ValueError(
            f"fold_bn needs a net in eval mode; {type(net).__name__} is training (fold only frozen copies)"
        )
    pairs = conv_bn_pairs(net)
    folded = copy.deepcopy(net)
    modules = dict(folded.named_modules())
    for conv_path, bn_path in pairs:
        conv, bn = modules[conv_path], modules[bn_path]
        assert isinstance(conv, _CONVS) and isinstance(bn, _BNS)  # conv_bn_pairs pairs only these
        fold_conv_bn(conv, bn)
        parent, _, leaf = bn_path.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, leaf, nn.Identity())
    folded.requires_grad_(False)
    folded.eval()
    return folded, pairs


__all__ = ["conv_bn_pairs", "fold_bn", "fold_conv_bn"]
