"""DB3KD: decision-based black-box KD (Wang, ICML 2021), hard answers only."""

from __future__ import annotations

from typing import Any, Literal

import torch

from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import boundary_kl, boundary_soft_labels
from kd_lightning.methods.blackbox_baselines.base import PoolBaseline, need_responses
from kd_lightning.teachers.client import QueryBudgetExceeded


class DB3KD(PoolBaseline):
    """Decision-based black-box KD (Wang, ICML 2021) as MEKD's ``DB3KD.py`` runs it (``mode='bd'``): hard answers only.

    At fit start every pool image is queried once for the teacher's class. The first time a pool image x0 (class
    c) comes up in training, for every other class t it takes ``n_starts`` pool images of class t (seeded per
    image) and bisects ``search_steps`` times along each line x0 -> x_t for the point where the teacher's answer
    turns to t; ``d_t`` is the shortest distance found. Its soft label is ``1 / d_t`` for t != c and their sum
    for c (:func:`~kd_lightning.losses.blackbox.boundary_soft_labels`); the student learns
    ``KL(softmax(label) || softmax(s / T))``. Cost per image: up to ``(C - 1) * n_starts * search_steps``
    queries (repeated probes are free): ``queries/spent`` is logged at each validation beside ``val/acc1``.

    When the next batch's labels would not fit the budget, ``on_budget: stop`` labels only as many images as fit
    and trains on the labelled ones from then on; ``raise`` ends the run with the budget error.

    Args:
        n_starts: images of each other class to search from (MEKD code: 11).
        search_steps: bisection steps per line (MEKD code: until the step is below 1e-5).
        T: temperature on the student's logits (MEKD code: 20).
        on_budget: ``"stop"`` or ``"raise"``.
        search_seed: seed of the choice of starting images.
        **kwargs: see :class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent`.
    """

    def __init__(
        self,
        n_starts: int = 11,
        search_steps: int = 17,
        T: float = 20.0,
        on_budget: Literal["stop", "raise"] = "stop",
        search_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        need_responses(kwargs.get("responses", "soft"), "hard", "DB3KD")
        if n_starts < 1 or search_steps < 1 or T <= 0 or on_budget not in ("stop", "raise"):
            raise ConfigError(
                f"n_starts={n_starts}, search_steps={search_steps}, T={T}, on_budget={on_budget!r}; expected "
                "n_starts >= 1, search_steps >= 1, T > 0, on_budget 'stop' or 'raise'"
            )
        super().__init__(**kwargs)
        self.labels: torch.Tensor | None = None  # the teacher's class of each pool image
        self.scores: torch.Tensor | None = None  # N x C soft labels (NaN: not computed yet)
        self.exhausted = False

    def per_image_cost(self) -> int:
        return (int(self.hparams.num_classes) - 1) * self.hparams.n_starts * self.hparams.search_steps

    def on_fit_start(self) -> None:
        super().on_fit_start()
        n = len(self.pool_dataset())
        labels = [self.client.query(self.client.prepare(self.pool_images(p))).cpu() for p in torch.arange(n).split(256)]
        self.labels = torch.cat(labels).long()
        self.scores = torch.full((n, int(self.hparams.num_classes)), float("nan"))

    def starts(self, i: int, target: int) -> torch.Tensor:
        """Indices of up to ``n_starts`` pool images the teacher puts in ``target``, drawn with a per-image seed."""
        assert self.labels is not None
        pool = (self.labels == target).nonzero().flatten()
        g = torch.Generator().manual_seed(self.hparams.search_seed * 1_000_003 + i)
        return pool[torch.randperm(len(pool), generator=g)[: self.hparams.n_starts]]

    def boundary_distances(self, idx: list[int]) -> torch.Tensor:
        """N x C shortest distances to the teacher's boundary towards each class (``inf``: none searched)."""
        assert self.labels is not None
        C = int(self.hparams.num_classes)
        rows, x0s, xts, targets = [], [], [], []
        for r, i in enumerate(idx):
            for t in range(C):
                if t == int(self.labels[i]):
                    continue
                for j in self.starts(i, t).tolist():
                    rows.append(r * C + t)
                    x0s.append(i)
                    xts.append(j)
                    targets.append(t)
        dist = torch.full((len(idx) * C,), float("inf"))
        if not rows:
            return dist.view(len(idx), C)
        x0 = self.client.prepare(self.pool_images(x0s))
        xt = self.client.prepare(self.pool_images(xts))
        target = torch.tensor(targets, device=x0.device)
        lo, hi = torch.zeros(len(rows), device=x0.device), torch.ones(len(rows), device=x0.device)
        for _ in range(self.hparams.search_steps):
            mid = (lo + hi) / 2
            probe = x0 + mid.view(-1, 1, 1, 1) * (xt - x0)
            turned = self.client.query(probe).to(x0.device) == target
            hi, lo = torch.where(turned, mid, hi), torch.where(turned, lo, mid)
        d = (hi * (xt - x0).flatten(1).norm(dim=1)).cpu()
        return dist.scatter_reduce(0, torch.tensor(rows), d, reduce="amin").view(len(idx), C)

    def label_batch(self, index: torch.Tensor) -> None:
        assert self.scores is not None and self.labels is not None
        todo = [int(i) for i in index if self.scores[int(i), 0].isnan()]
        if not todo or self.exhausted:
            return
        remaining = self.client.remaining
        if remaining is not None and remaining < len(todo) * self.per_image_cost():
            if self.hparams.on_budget == "raise":
                raise QueryBudgetExceeded(
                    f"DB3KD: labelling {len(todo)} more images needs up to {len(todo) * self.per_image_cost()} "
                    f"queries but {remaining} of query_budget={self.client.query_budget} are left"
                )
            todo = todo[: remaining // self.per_image_cost()]
            self.exhausted = True
            if not todo:
                return
        scores = boundary_soft_labels(self.boundary_distances(todo), self.labels[todo])
        self.scores[todo] = scores

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        assert self.scores is not None
        index = batch["index"].cpu()
        self.label_batch(index)
        keep = ~self.scores[index, 0].isnan()
        self.log("queries/labelled_images", float((~self.scores[:, 0].isnan()).sum()), on_step=True)
        if not keep.any():
            return None
        x = self.client.prepare(batch["image"][keep.to(batch["image"].device)])
        loss = boundary_kl(self(x), self.scores[index[keep]].to(x.device), self.hparams.T)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss


__all__ = ["DB3KD"]
