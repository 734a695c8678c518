"""Sample quality without downloads: FID / Intra-FID in a feature space trained here, label consistency, MAE.

FID is torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` with a custom feature
extractor: the penultimate features of a classifier (or regressor) trained in this project on the same
data (:class:`~kd_lightning.teachers.FrozenTeacher`), instead of the Inception net that would have to be
downloaded. Features are computed once per image and fed to the metric through a pass-through
extractor, so FID (all images) and Intra-FID (the mean over classes of the FID within each class,
Miyato & Koyama 2018) share one feature pass. Numbers in this space are comparable with each other
(and with the real-vs-real baseline computed the same way), not with published Inception FIDs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from kd_lightning.errors import ConfigError
from kd_lightning.teachers.frozen import FrozenTeacher


def fit_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-pad with zeros (smaller images, as the DataModules pad) or resize (larger) to ``size``."""
    h = x.shape[-1]
    if h == size:
        return x
    if h < size:
        extra = size - h
        return F.pad(x, [extra // 2, extra - extra // 2, extra // 2, extra - extra // 2])
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class _PassThrough(nn.Module):
    """Identity "feature extractor" for torchmetrics' FID when features are computed beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TeacherFeatures(nn.Module):
    """Images in [0, 1] -> the teacher's flattened penultimate features (and its outputs).

    Args:
        teacher: the frozen feature network.
        image_size: the side the teacher was trained at; generated images are padded/resized to it.
        layer: feature name for :meth:`FrozenTeacher.forward_features`.
    """

    def __init__(self, teacher: FrozenTeacher, image_size: int = 32, layer: str = "penultimate") -> None:
        super().__init__()
        self.teacher, self.image_size, self.layer = teacher, image_size, layer
        channels = int(teacher.normalize.mean.shape[1])
        with torch.no_grad():
            self.num_features = int(self(torch.rand(2, channels, image_size, image_size))[0].shape[1])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features N x F, outputs)`` in batches of whatever size is passed."""
        out, feats = self.teacher.forward_features(fit_size(x.float(), self.image_size), [self.layer])
        return feats[self.layer].flatten(1).float(), out.float()

    def batched(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.teacher.parameters()).device
        feats, outs = [], []
        for s in range(0, len(x), batch_size):
            f, o = self(x[s : s + batch_size].to(device))
            feats.append(f.cpu())
            outs.append(o.cpu())
        return torch.cat(feats), torch.cat(outs)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Compute torchmetrics' FID between two sets of precomputed features (N x F each, N >= 2)."""
    if len(real) < 2 or len(fake) < 2:
        raise ConfigError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    metric = FrechetInceptionDistance(feature=_PassThrough(real.shape[1]), normalize=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def intra_fid(
    real: torch.Tensor,
    real_labels: torch.Tensor,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    classes: Iterable[int] | None = None,
) -> tuple[float, dict[int, float]]:
    """Mean over classes of the FID between the real and fake features of each class, and the per-class values.

    Classes with fewer than 2 real or fake images are left out (and absent from the per-class dict).
    """
    classes = sorted(set(real_labels.tolist())) if classes is None else list(classes)
    per = {}
    for c in classes:
        r, f = real[real_labels == c], fake[fake_labels == c]
        if len(r) >= 2 and len(f) >= 2:
            per[int(c)] = fid_from_features(r, f)
    if not per:
        raise ConfigError("Intra-FID: no class has at least 2 real and 2 fake images")
    return float(sum(per.values()) / len(per)), per


def label_consistency(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the teacher classifies as their assigned label (cGAN-KD Table 6)."""
    return float((logits.argmax(1).cpu() == labels.cpu()).float().mean())


def per_class_take(images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of every class (fewer where a class has fewer)."""
    keep = torch.cat([(labels == c).nonzero().flatten()[:n] for c in labels.unique()])
    keep = keep.sort().values
    return images[keep], labels[keep]


__all__ = ["TeacherFeatures", "fid_from_features", "fit_size", "intra_fid", "label_consistency", "per_class_take"]
