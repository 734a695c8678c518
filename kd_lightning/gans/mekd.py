"""The generator and discriminator of MEKD's official code (HAIV-Lab/MEKD, ``project/DCGAN.py``), as an option.

Generator: linear(z -> 128 x (S/4)^2) -> BN -> [up-sample, conv 3x3 128 -> 128, BN(eps 0.8), LeakyReLU(0.2)]
-> [up-sample, conv 128 -> 64, BN(eps 0.8), LeakyReLU] -> conv 64 -> C -> tanh (S = image side, a multiple of 4).
Discriminator: four blocks [conv 3x3 stride 2, LeakyReLU(0.2), Dropout2d(0.25), BN(eps 0.8) except the first],
16-32-64-128 channels, then a linear logit (the official code ends in a sigmoid; here the loss takes the logit).
Both start from N(0, 0.02) conv weights and N(1, 0.02) BN scales, as the official ``weights_init_normal``.
``width`` scales the channel counts (1.0 = the official layout).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.gans.base import Generator


def init_normal(module: nn.Module) -> None:
    """Conv weights ~ N(0, 0.02); BatchNorm2d scales ~ N(1, 0.02), shifts 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class MEKDGenerator(Generator):
    """Images in [-1, 1] from z (``z_dim`` = the number of classes in MEKD).

    Args:
        z_dim: latent dimension.
        image_size: output side, a multiple of 4.
        out_channels: image channels.
        width: channel multiplier (1.0: 128/128/64 channels as the official code).
    """

    condition = "none"

    def __init__(self, z_dim: int = 10, image_size: int = 32, out_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        if image_size % 4 or image_size < 4:
            raise ConfigError(f"MEKDGenerator: image_size={image_size}; expected a multiple of 4")
        if z_dim < 1:
            raise ConfigError(f"z_dim={z_dim}; expected a positive integer")
        self.z_dim = z_dim
        self.init_size = image_size // 4
        c1, c2 = max(1, round(128 * width)), max(1, round(64 * width))
        self.c1 = c1
        self.l1 = nn.Linear(z_dim, c1 * self.init_size**2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.BatchNorm2d(c1, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c2, out_channels, 3, padding=1),
            nn.Tanh(),
        )
        init_normal(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_blocks(self.l1(z).view(len(z), self.c1, self.init_size, self.init_size))


class MEKDDiscriminator(nn.Module):
    """``forward(x in [-1, 1]) -> (N,)`` logits; ``y`` is ignored.

    Args:
        image_size: input side.
        in_channels: image channels.
        width: channel multiplier (1.0: 16/32/64/128 as the official code).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = in_channels, image_size
        for i, c in enumerate((16, 32, 64, 128)):
            cout = max(1, round(c * width))
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
            if i:
                layers.append(nn.BatchNorm2d(cout, 0.8))
            cin, side = cout, (side + 1) // 2
        self.model = nn.Sequential(*layers)
        self.adv_layer = nn.Linear(cin * side * side, 1)
        init_normal(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.adv_layer(self.model(x).flatten(1)).squeeze(1)
