"""DiffAugment (Zhao et al., 2020): differentiable colour, translation and cutout for GAN training.

The same random transformation family is applied to real and fake images in every discriminator
pass (and to the fakes in the generator pass), so the discriminator never sees un-augmented data
and cannot overfit a small training set. Every operation is built from differentiable tensor ops,
so gradients reach the generator. Images are expected in [-1, 1] (the GAN range), N x C x H x W.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError


def rand_brightness(x: torch.Tensor) -> torch.Tensor:
    """Add one random offset in [-0.5, 0.5) per image."""
    return x + (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def rand_saturation(x: torch.Tensor) -> torch.Tensor:
    """Scale the deviation from the per-pixel channel mean by a factor in [0, 2) (a no-op on grey images)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean


def rand_contrast(x: torch.Tensor) -> torch.Tensor:
    """Scale the deviation from the image mean by a factor in [0.5, 1.5)."""
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def rand_translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size in each direction, filling with zeros."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, size=[n, 1, 1], device=x.device)
    ty = torch.randint(-sw, sw + 1, size=[n, 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(h, device=x.device),
        torch.arange(w, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def rand_cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of side ``ratio`` x size at a random position per image (the mask is constant)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), size=[n, 1, 1], device=x.device)
    oy = torch.randint(0, w + (1 - cw % 2), size=[n, 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(ch, device=x.device),
        torch.arange(cw, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + ox - ch // 2, min=0, max=h - 1)
    gy = torch.clamp(gy + oy - cw // 2, min=0, max=w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


AUGMENTS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}


def parse_policy(policy: str | Sequence[str]) -> list[str]:
    """``"color,translation,cutout"`` (or a list) -> validated list of names; ``""`` is no augmentation."""
    names = [p.strip() for p in (policy.split(",") if isinstance(policy, str) else policy) if p.strip()]
    bad = [p for p in names if p not in AUGMENTS]
    if bad:
        raise ConfigError(f"DiffAugment policy {policy!r}: unknown {bad}; expected names from {sorted(AUGMENTS)}")
    return names


def diff_augment(x: torch.Tensor, policy: str | Sequence[str] = "color,translation,cutout") -> torch.Tensor:
    """Apply the DiffAugment ``policy`` (comma-separated names) to a batch; shape is kept."""
    for name in parse_policy(policy):
        for fn in AUGMENTS[name]:
            x = fn(x)
    return x.contiguous()


class DiffAugment(torch.nn.Module):
    """:func:`diff_augment` as a module (identity when the policy is empty)."""

    def __init__(self, policy: str | Sequence[str] = "color,translation,cutout") -> None:
        super().__init__()
        self.policy = parse_policy(policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.policy) if self.policy else x

    def extra_repr(self) -> str:
        return ",".join(self.policy)
