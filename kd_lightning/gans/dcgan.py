"""DCGAN (Radford et al., 2016) with the latent dimension as a parameter.

A MEKD-like deprivatisation sets ``z_dim`` to the teacher's number of classes (z ~ N(0, I)) so that the
generator can later be fed logits. Generator: linear -> BN -> (up-sample, conv, BN, LeakyReLU) x k -> conv
-> tanh, a DCGAN/DAFL-style generator (DAFL's layout, with as many up-samplings as the image size needs);
discriminator: strided convs with LeakyReLU and BatchNorm, a linear logit. Unconditional: ``forward(z, y=None)``.
This is NOT the layout of MEKD's own ``DCGAN.py`` (two up-samplings at width 128, 3x3 convolutions, dropout).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.gans.base import Generator
from kd_lightning.gans.resnet import num_upsamplings


class DCGANGenerator(Generator):
    """Images in [-1, 1] from z (``z_dim`` numbers, e.g. the number of classes for MEKD).

    Args:
        z_dim: latent dimension.
        image_size: output side (28, 32, 64, ...).
        out_channels: image channels.
        ch: width of the last feature map (the first is ``2 * ch``).
    """

    condition = "none"

    def __init__(self, z_dim: int = 100, image_size: int = 32, out_channels: int = 3, ch: int = 64) -> None:
        super().__init__()
        if z_dim < 1:
            raise ConfigError(f"z_dim={z_dim}; expected a positive integer")
        self.z_dim = z_dim
        n_up, self.bottom = num_upsamplings(image_size)
        self.width = 2 * ch
        self.linear = nn.Linear(z_dim, self.width * self.bottom**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(self.width)]
        cin = self.width
        for i in range(n_up):
            cout = 2 * ch if i < n_up - 1 else ch
            layers += [
                nn.Upsample(scale_factor=2),
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            cin = cout
        layers += [nn.Conv2d(cin, out_channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.linear(z).view(len(z), self.width, self.bottom, self.bottom))


class DCGANDiscriminator(nn.Module):
    """Strided-conv discriminator: ``forward(x in [-1, 1]) -> (N,)`` logits (``y`` is ignored).

    Args:
        image_size: input side.
        in_channels: image channels.
        ch: width of the first conv (doubling per block, up to ``8 * ch``).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, ch: int = 64) -> None:
        super().__init__()
        n_down, bottom = num_upsamplings(image_size)
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(n_down):
            cout = ch * 2 ** min(i, 3)
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
            if i:
                layers.append(nn.BatchNorm2d(cout))
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        self.net = nn.Sequential(*layers)
        self.linear = nn.Linear(cin * bottom**2, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.net(x).flatten(1)).squeeze(1)
