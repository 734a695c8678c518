"""DAFL's generator (Chen et al., ICCV 2019), the layout of the DAFL and MEKD code, written afresh."""

from __future__ import annotations

import torch
from torch import nn


class DAFLGenerator(nn.Module):
    """z -> Linear -> 128 x s/4 x s/4 -> BN -> up x2 -> conv-BN-LReLU -> up x2 -> conv-BN-LReLU -> conv -> tanh -> BN.

    The last BatchNorm has no affine part, so the images come out standardised (zero mean, unit variance per
    channel): they are in the teacher's *normalised* input space, as in the original code.

    Args:
        z_dim: latent size (DAFL: 100).
        image_size: side of the images (a multiple of 4).
        channels: image channels.
    """

    def __init__(self, z_dim: int = 100, image_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"DAFLGenerator: image_size={image_size}; expected a multiple of 4")
        self.z_dim, self.init = z_dim, image_size // 4
        self.fc = nn.Linear(z_dim, 128 * self.init**2)
        self.bn0 = nn.BatchNorm2d(128)
        # eps 0.8 is what the original passes as BatchNorm2d's second positional argument
        self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, 1, 1),
            nn.BatchNorm2d(64, 0.8),
            nn.LeakyReLU(0.2),
            nn.Conv2d(64, channels, 3, 1, 1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z).view(len(z), 128, self.init, self.init))
        x = self.block1(nn.functional.interpolate(x, scale_factor=2))
        return self.block2(nn.functional.interpolate(x, scale_factor=2))
