"""Batch-level Cutout, Mixup and CutMix, applied by a LightningModule to a training batch.

They live at batch level (not in the DataModule's per-image transforms) because Mixup and CutMix
change the targets: every loss term of a self-KD method must see the same mixing coefficient and
partner permutation. :class:`BatchMixer` returns a :class:`MixedBatch` that carries them, so a
method mixes its cross-entropy (``lam * CE(y_a) + (1 - lam) * CE(y_b)``) and its soft targets
(``lam * q + (1 - lam) * q[perm]``) consistently.

Random numbers come from torch's global CPU generator, which kdl's resume callback saves and
restores, so a resumed run mixes exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError

MixMode = Literal["none", "cutout", "mixup", "cutmix"]
MIX_MODES: tuple[str, ...] = ("none", "cutout", "mixup", "cutmix")


@dataclass
class MixedBatch:
    """A (possibly) mixed batch: ``image = lam * x + (1 - lam) * x[perm]`` (Mixup) or a pasted box (CutMix).

    ``perm`` is ``None`` when nothing was mixed (``lam`` is then 1). ``pair_image`` is the CS-KD
    partner batch, mixed with the same ``lam``/``perm``/box so that a mixed pair keeps the mixed label.
    """

    image: torch.Tensor
    label: torch.Tensor
    lam: float = 1.0
    perm: torch.Tensor | None = None
    pair_image: torch.Tensor | None = None

    @property
    def mixed(self) -> bool:
        return self.perm is not None

    def cross_entropy(self, logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy on the mixed labels (plain CE when nothing was mixed)."""
        ce = F.cross_entropy(logits.float(), self.label, label_smoothing=label_smoothing)
        if self.perm is None:
            return ce
        return self.lam * ce + (1.0 - self.lam) * F.cross_entropy(
            logits.float(), self.label[self.perm], label_smoothing=label_smoothing
        )

    def mix_targets(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-sample target distributions of the original images, mixed like the images."""
        if self.perm is None:
            return probs
        return self.lam * probs + (1.0 - self.lam) * probs[self.perm]


class BatchMixer:
    """Cutout (DeVries & Taylor 2017), Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) on a batch.

    Args:
        mode: ``"none"``, ``"cutout"``, ``"mixup"`` or ``"cutmix"``.
        alpha: Beta(alpha, alpha) parameter of the mixing coefficient (Mixup, CutMix).
        prob: probability that a batch is mixed / cut out at all.
        cutout_size: side of the Cutout square in pixels (default: half the image side, as in the
            paper's 16 px on 32 px CIFAR images).
        fill: value written into the Cutout square, per channel, in the [0, 1] image space (pass
            the normalisation mean so that the square is 0 after normalisation, as in the paper).
    """

    def __init__(
        self,
        mode: MixMode = "none",
        alpha: float = 1.0,
        prob: float = 1.0,
        cutout_size: int | None = None,
        fill: torch.Tensor | float = 0.0,
    ) -> None:
        if mode not in MIX_MODES:
            raise ConfigError(f"mixing={mode!r}; expected one of {', '.join(MIX_MODES)}")
        if alpha <= 0:
            raise ConfigError(f"mix_alpha={alpha}; expected a positive number")
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"mix_prob={prob}; expected a probability in [0, 1]")
        if cutout_size is not None and cutout_size < 1:
            raise ConfigError(f"cutout_size={cutout_size}; expected a positive number of pixels or null")
        self.mode, self.alpha, self.prob, self.cutout_size, self.fill = mode, alpha, prob, cutout_size, fill

    def __call__(self, image: torch.Tensor, label: torch.Tensor, pair_image: torch.Tensor | None = None) -> MixedBatch:
        if self.mode == "none" or (self.prob < 1.0 and float(torch.rand(())) >= self.prob):
            return MixedBatch(image, label, pair_image=pair_image)
        if self.mode == "cutout":
            return MixedBatch(
                self.cutout(image), label, pair_image=None if pair_image is None else self.cutout(pair_image)
            )
        n = image.shape[0]
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        perm = torch.randperm(n).to(image.device)
        if self.mode == "mixup":
            mix = lambda x: lam * x + (1.0 - lam) * x[perm]  # noqa: E731
        else:
            h, w = image.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(h, w, lam)
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted

            def mix(x: torch.Tensor) -> torch.Tensor:
                out = x.clone()
                out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
                return out

        return MixedBatch(mix(image), label, lam, perm, None if pair_image is None else mix(pair_image))

    def cutout(self, image: torch.Tensor) -> torch.Tensor:
        """One square per image, centred uniformly in the image and clipped at the borders."""
        n, _, h, w = image.shape
        size = self.cutout_size or max(1, min(h, w) // 2)
        cy = (torch.rand(n) * h).long().to(image.device)
        cx = (torch.rand(n) * w).long().to(image.device)
        rows = torch.arange(h, device=image.device).view(1, h, 1)
        cols = torch.arange(w, device=image.device).view(1, 1, w)
        y0, x0 = (cy - size // 2).view(n, 1, 1), (cx - size // 2).view(n, 1, 1)
        inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)
        fill = torch.as_tensor(self.fill, dtype=image.dtype, device=image.device).reshape(1, -1, 1, 1)
        return torch.where(inside.unsqueeze(1), fill.expand_as(image[:1]), image)


def cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area ``(1 - lam) * h * w`` centred uniformly in the image, clipped: ``(y0, y1, x0, x1)``."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


__all__ = ["MIX_MODES", "BatchMixer", "MixMode", "MixedBatch", "cutmix_box"]
