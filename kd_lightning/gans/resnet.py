"""SNGAN/BigGAN-style ResNet generator and discriminator (Miyato et al. 2018; Brock et al. 2019).

Generator: a linear map of z to a small feature map, up-sampling residual blocks with conditional
BatchNorm, then BN-ReLU-conv-tanh. Discriminator: down-sampling residual blocks with spectral norm
on every layer, ReLU, global sum pooling, a linear output plus a projection term
(Miyato & Koyama 2018) that carries the condition. One pair of classes serves three conditions:

- ``"class"``: class ids; the generator's conditional BN takes ``[shared_embedding(y), z]``
  (BigGAN's shared class embedding with skip-z), the discriminator projects ``embedding(y)``.
- ``"continuous"`` (CcGAN): labels in [0, 1]. With ``label_embed=None`` this is the naive label
  input (NLI) of Ding et al. (2021), as in their code: ``y`` is added to every element of the
  generator's first feature map (``linear(z) + y``) and the discriminator adds ``(y + 1) <w, h>``;
  with a label-to-embedding net (ILI) the embedding ``h_y`` drives the conditional BN and the
  projection ``<W h_y, h>``.
- ``"none"``: unconditional.

Sizes: the number of up/down-sampling blocks follows the image side: 28 px (7 -> 14 -> 28),
32 px (4 -> 8 -> 16 -> 32), 64 px (4 -> ... -> 64), any side ``s * 2^k`` with ``4 <= s < 8``.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.gans.base import Generator
from kd_lightning.gans.spectral_norm import power_iteration_hook, spectral_norm

Condition = Literal["class", "continuous", "none"]


def num_upsamplings(image_size: int) -> tuple[int, int]:
    """``(blocks, bottom side)``: halve the side while it stays even and >= 4 after halving (>= 1 block)."""
    if image_size < 8:
        raise ConfigError(f"image_size={image_size}; the ResNet GANs need at least 8 px")
    n, side = 0, image_size
    while side % 2 == 0 and side // 2 >= 4:
        n, side = n + 1, side // 2
    if n == 0:
        raise ConfigError(f"image_size={image_size}; expected a side s * 2^k with k >= 1 (e.g. 28, 32, 64)")
    return n, side


def _check_condition(condition: str, num_classes: int | None) -> None:
    if condition not in ("class", "continuous", "none"):
        raise ConfigError(f"condition={condition!r}; expected 'class', 'continuous' or 'none'")
    if condition == "class" and (num_classes is None or num_classes < 1):
        raise ConfigError(f"a class-conditional GAN needs num_classes >= 1, got {num_classes}")


def _label(y: torch.Tensor | None) -> torch.Tensor:
    """``y``, which a conditional GAN needs."""
    if y is None:
        raise ValueError("this GAN is conditional: pass the labels y")
    return y


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters whose gain ``1 + g(c)`` and bias ``b(c)`` are linear in ``c``."""

    def __init__(self, num_features: int, cond_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=cond_dim == 0)
        self.cond_dim = cond_dim
        if cond_dim:
            self.gain = nn.Linear(cond_dim, num_features, bias=False)
            self.bias = nn.Linear(cond_dim, num_features, bias=False)
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        out = self.bn(x)
        if not self.cond_dim:
            return out
        return out * (1 + self.gain(c))[:, :, None, None] + self.bias(c)[:, :, None, None]


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 up-sampling, through channels-last for an NCHW input and back.

    The same values and gradients bit for bit as ``F.interpolate(x, scale_factor=2, mode="nearest")``; on CPU the
    channels-last kernel is ~1.5x faster than the NCHW one even with the two layout changes (docs/performance.md).
    """
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.interpolate(x.contiguous(memory_format=torch.channels_last), scale_factor=2, mode="nearest").contiguous()


class GenBlock(nn.Module):
    """BN-ReLU-up-conv-BN-ReLU-conv with a 1x1 up-sampled shortcut."""

    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, cond_dim)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(cout, cond_dim)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = upsample2(F.relu(self.bn1(x, c)))
        h = self.conv2(F.relu(self.bn2(self.conv1(h), c)))
        return h + self.shortcut(upsample2(x))


class ResNetGenerator(Generator):
    """SNGAN/BigGAN-style ResNet generator (see the module docstring for the conditions).

    Args:
        image_size: output side in pixels (28, 32, 64, ...).
        out_channels: image channels.
        z_dim: latent dimension (z ~ N(0, I)).
        ch: base width; block widths go ``ch * 2^(k-1) ... ch`` from the bottom up.
        condition: ``"class"``, ``"continuous"`` or ``"none"``.
        num_classes: classes of a class-conditional generator.
        shared_dim: width of the shared class embedding (class condition).
        label_embed: for ``"continuous"``: ``None`` = NLI, else a net mapping labels (N,) to
            embeddings (N x ``embed_dim``) (ILI); it is kept frozen.
        embed_dim: output width of ``label_embed``.
    """

    def __init__(
        self,
        image_size: int = 32,
        out_channels: int = 3,
        z_dim: int = 128,
        ch: int = 64,
        condition: Condition = "class",
        num_classes: int | None = None,
        shared_dim: int = 128,
        label_embed: nn.Module | None = None,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        _check_condition(condition, num_classes)
        self.z_dim, self.condition, self.num_classes = z_dim, condition, num_classes
        n_up, self.bottom = num_upsamplings(image_size)
        widths = [ch * 2 ** min(i, 3) for i in range(n_up, -1, -1)]  # bottom-up, capped at 8 ch
        self.widths = widths
        if condition == "class":
            assert num_classes is not None  # _check_condition
            self.shared = nn.Embedding(num_classes, shared_dim)
            cond_dim = shared_dim + z_dim
        elif condition == "continuous" and label_embed is not None:
            self.label_embed = label_embed.requires_grad_(False)
            cond_dim = embed_dim
        else:
            cond_dim = 0
        self.uses_embedding = condition == "continuous" and label_embed is not None
        self.linear = nn.Linear(z_dim, widths[0] * self.bottom**2)
        self.blocks = nn.ModuleList(GenBlock(a, b, cond_dim) for a, b in itertools.pairwise(widths))
        self.out_bn = nn.BatchNorm2d(widths[-1])
        self.out_conv = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def condition_vector(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        if self.condition == "class":
            return torch.cat([self.shared(y), z], dim=1)
        if self.uses_embedding:
            self.label_embed.eval()
            return self.label_embed(_label(y).float())
        return None

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.condition_vector(z, y)
        h = self.linear(z)
        if self.condition == "continuous" and not self.uses_embedding:
            h = h + _label(y).float().view(-1, 1)  # NLI: the label is added to every element of the first feature map
        h = h.view(len(z), -1, self.bottom, self.bottom)
        for block in self.blocks:
            h = block(h, c)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class DisBlock(nn.Module):
    """ReLU-conv-ReLU-conv(-avgpool) with a spectral-normed 1x1 shortcut (the first block skips the first ReLU)."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = spectral_norm(nn.Conv2d(cin, cout, 1)) if (cin != cout or down) else None
        self.down, self.first = down, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # optimised block: pool then 1x1 conv
            assert self.shortcut is not None  # a first block changes the width and pools
            s = self.shortcut(F.avg_pool2d(x, 2) if self.down else x)
        elif self.shortcut is not None:
            s = self.shortcut(x)
            s = F.avg_pool2d(s, 2) if self.down else s
        return h + s


class ResNetDiscriminator(nn.Module):
    """Spectral-norm ResNet discriminator with a projection head; ``forward(x in [-1, 1], y) -> (N,)`` logits.

    Args:
        image_size: input side in pixels.
        in_channels: image channels.
        ch: base width (blocks ``ch, 2ch, 4ch, ...``, capped at ``8ch``).
        condition: ``"class"``, ``"continuous"`` or ``"none"``.
        num_classes: classes (class condition).
        embed_dim: for continuous labels given as embeddings (ILI), their width; ``y`` is then
            ``N x embed_dim``. With NLI ``y`` is ``(N,)``.
        label_is_embedding: ``True`` for ILI.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        ch: int = 64,
        condition: Condition = "class",
        num_classes: int | None = None,
        embed_dim: int = 128,
        label_is_embedding: bool = False,
    ) -> None:
        super().__init__()
        _check_condition(condition, num_classes)
        self.condition, self.num_classes, self.label_is_embedding = condition, num_classes, label_is_embedding
        n_up, bottom = num_upsamplings(image_size)
        n_down = n_up - 1 if bottom == 4 and n_up > 1 else n_up  # the last blocks work on 7x7 or 8x8 maps
        widths = [ch * 2 ** min(i, 3) for i in range(n_down + 1)]
        blocks: list[nn.Module] = [DisBlock(in_channels, widths[0], down=True, first=True)]
        blocks += [DisBlock(a, b, down=True) for a, b in itertools.pairwise(widths[:-1])]
        blocks += [DisBlock(widths[-2], widths[-1], down=False), DisBlock(widths[-1], widths[-1], down=False)]
        self.blocks = nn.Sequential(*blocks)
        feat = widths[-1]
        self.linear = spectral_norm(nn.Linear(feat, 1))
        if condition == "class":
            assert num_classes is not None  # _check_condition
            self.embed = spectral_norm(nn.Embedding(num_classes, feat))
        elif condition == "continuous":
            self.embed = spectral_norm(nn.Linear(embed_dim if label_is_embedding else 1, feat, bias=False))
        power_iteration_hook(self)  # each training forward first updates every layer's u and v (eagerly)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(x)).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        out = self.linear(h).squeeze(1)
        if self.condition == "class":
            out = out + (self.embed(y) * h).sum(1)
        elif self.condition == "continuous":
            # NLI projects y + 1 (as the CcGAN code), so that y = 0 still carries a condition
            y = _label(y)
            e = self.embed(y.float() if self.label_is_embedding else y.float().view(-1, 1) + 1)
            out = out + (e * h).sum(1)
        return out
