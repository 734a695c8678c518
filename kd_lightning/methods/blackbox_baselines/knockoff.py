"""KN: Knockoff Nets (Orekondy et al., CVPR 2019) against the black box, random policy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import KLScale, tempered_kl
from kd_lightning.methods.blackbox_baselines.base import PoolBaseline, need_responses
from kd_lightning.methods.blackbox_student import answer_logits
from kd_lightning.teachers.client import QueryBudgetExceeded


class KN(PoolBaseline):
    """Knockoff Nets (Orekondy et al., CVPR 2019), random policy, as MEKD's ``KN.py`` runs it.

    Transfer-set construction: ``transfer_size`` items of the local pool drawn at random (seeded, no replacement)
    are queried up front at fit start, in requests of ``build_batch`` images; then the student learns
    ``tau-scaled KL(softmax(t / T) || softmax(s / T))`` on the transfer set only, each image seen under a fresh
    random crop (``augment``) while its answer stays the one paid for. The adaptive (bandit) policy of the paper is
    not implemented. Soft answers only.

    Args:
        transfer_size: images in the transfer set (``None``: the whole pool); must fit in ``query_budget``.
        policy_seed: seed of the random policy.
        T: temperature (MEKD code: 5).
        kl_scale: factor of the KL: ``"tau"`` (MEKD code), ``"tau2"`` or ``"none"``.
        augment: random crops (padding 1/8 of the side) of the transfer images during training.
        build_batch: images per request while building the transfer set.
        **kwargs: see :class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent`.
    """

    def __init__(
        self,
        transfer_size: int | None = None,
        policy_seed: int = 0,
        T: float = 5.0,
        kl_scale: KLScale = "tau",
        augment: bool = True,
        build_batch: int = 256,
        **kwargs: Any,
    ) -> None:
        need_responses(kwargs.get("responses", "soft"), "soft", "KN")
        if (transfer_size is not None and transfer_size < 1) or T <= 0 or build_batch < 1:
            raise ConfigError(
                f"transfer_size={transfer_size}, T={T}, build_batch={build_batch}; expected >= 1 (or null), > 0, >= 1"
            )
        super().__init__(**kwargs)
        self.transfer: torch.Tensor | None = None  # N x C answers (NaN outside the transfer set), rebuilt each fit

    def transfer_indices(self, n: int) -> torch.Tensor:
        """The random policy: ``transfer_size`` of ``n`` pool items, sorted."""
        size = self.hparams.transfer_size or n
        if size > n:
            raise ConfigError(f"KN: transfer_size={size} but the pool holds {n} images")
        g = torch.Generator().manual_seed(self.hparams.policy_seed)
        return torch.randperm(n, generator=g)[:size].sort().values

    def on_fit_start(self) -> None:
        super().on_fit_start()
        n = len(self.pool_dataset())
        chosen = self.transfer_indices(n)
        budget = self.client.query_budget
        if budget is not None and len(chosen) > budget:
            raise QueryBudgetExceeded(
                f"KN: a transfer set of {len(chosen)} images exceeds query_budget={budget}; "
                "lower transfer_size or raise the budget"
            )
        answers = torch.full((n, int(self.hparams.num_classes)), float("nan"))
        for part in chosen.split(self.hparams.build_batch):
            x = self.client.prepare(self.pool_images(part))
            answers[part] = self.client.query(x).float().cpu()
        self.transfer = answers

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        assert self.transfer is not None
        index = batch["index"].cpu()
        keep = ~self.transfer[index, 0].isnan()
        if not keep.any():
            return None  # no transfer image in this batch
        x = self.client.prepare(batch["image"][keep.to(batch["image"].device)])
        if self.hparams.augment:
            x = random_crop(x)
        t = answer_logits(self.transfer[index[keep]], "soft", self.hparams.num_classes).to(x.device)
        loss = tempered_kl(self(x), t, self.hparams.T, self.hparams.kl_scale)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/kl", loss.detach(), on_step=True, on_epoch=True)
        return loss


def random_crop(x: torch.Tensor) -> torch.Tensor:
    """Each image cropped at a random offset from a zero padding of 1/8 of its side (same size out)."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * pad + 1, (len(x), 2)).tolist()):
        out[i] = padded[i, :, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    return out


__all__ = ["KN", "random_crop"]
