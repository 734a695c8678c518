"""The improved label input (ILI) of CcGAN (Ding et al., 2021): label -> embedding nets.

Two plain nets, trained one after the other on real data by
:class:`kd_lightning.methods.gan.LabelEmbedding`: ``EmbeddingRegressor`` maps an image to a
feature ``h`` and ``h`` to the label with a final linear layer ``h2y``; then ``LabelToEmbedding``
(an MLP) is trained so that the frozen ``h2y`` maps its output back to the (noise-perturbed) label.
The CcGAN generator and discriminator then take ``LabelToEmbedding(y)`` instead of ``y``.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.nets import create_net


class EmbeddingRegressor(nn.Module):
    """A registered backbone whose features go through ``dim`` ReLU units (``h``) and a linear ``h2y``."""

    def __init__(self, net: str = "resnet8", in_channels: int = 3, dim: int = 128) -> None:
        super().__init__()
        self.backbone = create_net(net, num_classes=dim, in_channels=in_channels, task="classification")
        self.h2y = nn.Sequential(nn.Linear(dim, 1), nn.ReLU())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h2y(self.embed(x)).squeeze(1)


class LabelToEmbedding(nn.Module):
    """MLP from a label in [0, 1] (N,) to an embedding (N x ``dim``), ReLU output like ``h``."""

    def __init__(self, dim: int = 128, hidden: int = 128, layers: int = 4) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        width = 1
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.GroupNorm(8, hidden), nn.ReLU()]
            width = hidden
        mods += [nn.Linear(width, dim), nn.ReLU()]
        self.net = nn.Sequential(*mods)
        self.dim = dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y.float().view(-1, 1))
