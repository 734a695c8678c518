"""The conditional density-ratio model r(x|y) that cDR-RS samples with, and its loader.

:class:`DensityRatioModel` is a plain ``nn.Module``: a frozen encoder (a kdl classifier or regressor) and a
label-conditioned MLP (:class:`RatioHead`). :class:`~kd_lightning.methods.density_ratio.DensityRatioEstimator`
trains it and stores it whole in its checkpoint (``checkpoint["density_ratio_model"]``: a spec and a state
dict), so :func:`load_density_ratio` rebuilds it from that one file, without Lightning or the method.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.metrics.gan import fit_size
from kd_lightning.nets import create_net
from kd_lightning.nets.normalize import Normalize
from kd_lightning.teachers import FrozenTeacher


class RatioHead(nn.Module):
    """r(h, y) >= 0: an MLP on features concatenated with the label's embedding (classes) or the scalar label.

    Each hidden layer is Linear, GroupNorm(8), ReLU, Dropout, as the official ``cDR_MLP``; a final
    Linear and ReLU give the ratio.
    """

    def __init__(self, feat_dim: int, task: str, num_classes: int | None, widths: list[int], dropout: float) -> None:
        super().__init__()
        if task != "classification":
            cond = 1
        elif num_classes is None:
            raise ConfigError("RatioHead: task='classification' needs num_classes; got None")
        else:
            cond = int(num_classes)
        self.label_emb = nn.Embedding(cond, cond) if task == "classification" else None
        layers: list[nn.Module] = []
        d = feat_dim + cond
        for w in widths:
            layers += [nn.Linear(d, w), nn.GroupNorm(min(8, w), w), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            d = w
        layers += [nn.Linear(d, 1), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cond = self.label_emb(y.long()) if self.label_emb is not None else y.float().view(-1, 1)
        return self.mlp(torch.cat([h, cond], 1)).squeeze(1)


class DensityRatioModel(nn.Module):
    """Frozen encoder + label-conditioned MLP: images in [0, 1] and labels -> r(x|y) >= 0.

    Args:
        encoder: the frozen feature network.
        task: ``"classification"`` (class labels) or ``"regression"`` (labels in [0, 1]).
        num_classes: classes (classification).
        widths: hidden widths of the MLP.
        dropout: dropout after every hidden layer.
        encoder_size: image side the encoder takes (images are padded/resized to it).
        layer: encoder feature name (``"penultimate"``, ``stage{i}`` or a module path).
    """

    def __init__(
        self,
        encoder: FrozenTeacher,
        task: str,
        num_classes: int | None,
        widths: list[int],
        dropout: float,
        encoder_size: int,
        layer: str = "penultimate",
    ) -> None:
        super().__init__()
        self.encoder, self.task, self.num_classes = encoder, task, num_classes
        self.encoder_sha256: str | None = None  # the encoder checkpoint's hash (kdl generate reuses its outputs)
        self.encoder_size, self.layer = encoder_size, layer
        channels = int(encoder.normalize.mean.shape[1])
        with torch.no_grad():
            feat_dim = self.features(torch.zeros(2, channels, encoder_size, encoder_size))[0].shape[1]
        self.head = RatioHead(int(feat_dim), task, num_classes, widths, dropout)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features N x F, encoder outputs) of images in [0, 1]."""
        out, feats = self.encoder.forward_features(fit_size(images.float(), self.encoder_size), [self.layer])
        return feats[self.layer].flatten(1).float(), out.float()

    def ratio_from_features(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(h, y)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.ratio_from_features(self.features(images)[0], labels)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this module without any other file (see :func:`load_density_ratio`)."""
        e = self.encoder
        widths = [m.out_features for m in self.head.mlp if isinstance(m, nn.Linear)][:-1]
        dropout = next((m.p for m in self.head.mlp if isinstance(m, nn.Dropout)), 0.0)
        return {
            "encoder_net": e.net_name,
            "encoder_task": e.task,
            "encoder_classes": e.num_classes,
            "in_channels": int(e.normalize.mean.shape[1]),
            "encoder_size": self.encoder_size,
            "layer": self.layer,
            "task": self.task,
            "num_classes": self.num_classes,
            "widths": widths,
            "dropout": dropout,
            "encoder_sha256": self.encoder_sha256,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> DensityRatioModel:
        c = spec["in_channels"]
        net = create_net(spec["encoder_net"], spec["encoder_classes"] or 1, c, spec["encoder_task"])
        encoder = FrozenTeacher(
            net,
            Normalize((0.5,) * c, (0.5,) * c, c),
            spec["encoder_task"],
            spec["encoder_classes"],
            spec["encoder_net"],
        )
        model = cls(
            encoder,
            spec["task"],
            spec["num_classes"],
            spec["widths"],
            spec["dropout"],
            spec["encoder_size"],
            spec["layer"],
        )
        model.load_state_dict(state)
        model.encoder_sha256 = spec.get("encoder_sha256")
        return model.eval()


def load_density_ratio(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DensityRatioModel:
    """The :class:`DensityRatioModel` of a :class:`DensityRatioEstimator` checkpoint (no other file needed)."""
    from kd_lightning.checkpoints import load_checkpoint

    if not os.path.isfile(path):
        raise CheckpointError(f"density-ratio checkpoint {str(path)!r} not found; train one with kdl fit (dr.yaml)")
    ckpt = load_checkpoint(path)
    saved = ckpt.get("density_ratio_model")
    if not saved:
        raise CheckpointError(f"{str(path)!r} was not written by DensityRatioEstimator (no density_ratio_model)")
    state = {k: v.to(map_location) for k, v in saved["state_dict"].items()}
    return DensityRatioModel.from_spec(saved["spec"], state).to(map_location)


__all__ = ["DensityRatioModel", "RatioHead", "load_density_ratio"]
