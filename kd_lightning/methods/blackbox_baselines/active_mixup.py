"""AM: Active Mixup (Wang et al., CVPR 2020) against the black box."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import soft_cross_entropy
from kd_lightning.methods.blackbox_baselines.base import PoolBaseline, need_responses


class AM(PoolBaseline):
    """Active Mixup (Wang et al., CVPR 2020), the "AM" of MEKD's table, as MEKD's ``AM.py`` runs it.

    Round 0 queries the pool's local images (soft) and trains the student on ``-sum p log softmax(s)``. At the
    start of each later round (epoch boundaries from ``round_epochs``) the current student scores candidate pairs
    ``(i, i - k)`` of pool images (k = 1, 2, ..., at most ``candidate_pairs`` pairs not chosen before) at mixing
    weights w in ``0.30, 0.34, ..., 0.70``; each pair keeps the w where the student's top probability is lowest, and
    the ``mix_per_round`` most uncertain mixes ``w a + (1 - w) b`` are queried and join the training set. Each
    training step adds to the pool batch a random batch of the mixed images chosen so far, in proportion to their
    number. Queries: the pool, plus ``mix_per_round`` per round. The chosen pairs, weights and answers are
    checkpointed.

    Args:
        round_epochs: epochs of each round (MEKD code: 80, 60, 40, 20 -> 3 mix-up rounds).
        mix_per_round: mixed images queried per round (MEKD code: 10,000).
        candidate_pairs: pairs scored per round (MEKD code: 500,000).
        score_batch: images per student forward while scoring.
        **kwargs: see :class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent`.
    """

    WEIGHTS = torch.arange(0.30, 0.70 + 1e-6, 0.04)
    ROUNDS = (80, 60, 40, 20)

    def __init__(
        self,
        round_epochs: list[int] | None = None,
        mix_per_round: int = 10_000,
        candidate_pairs: int = 500_000,
        score_batch: int = 1024,
        **kwargs: Any,
    ) -> None:
        need_responses(kwargs.get("responses", "soft"), "soft", "AM")
        rounds = list(round_epochs or self.ROUNDS)
        if not rounds or min(rounds) < 1 or mix_per_round < 1 or candidate_pairs < 1 or score_batch < 1:
            raise ConfigError(
                f"round_epochs={rounds}, mix_per_round={mix_per_round}, candidate_pairs={candidate_pairs}, "
                f"score_batch={score_batch}; expected positive numbers"
            )
        super().__init__(**kwargs)
        self.mix_pairs = torch.zeros(0, 2, dtype=torch.long)
        self.mix_weights = torch.zeros(0)
        self.mix_answers = torch.zeros(0, int(self.hparams.num_classes or 0))
        self.rounds_done = 0

    def round_starts(self) -> list[int]:
        """Epochs at which mix-up rounds 1, 2, ... begin."""
        starts, total = [], 0
        for e in list(self.hparams.round_epochs or self.ROUNDS)[:-1]:
            total += e
            starts.append(total)
        return starts

    def on_fit_start(self) -> None:
        super().on_fit_start()
        budget = self.client.query_budget
        need = len(self.pool_dataset()) + len(self.round_starts()) * self.hparams.mix_per_round
        if budget is not None and need > budget:
            raise ConfigError(
                f"AM: {len(self.pool_dataset())} pool images + {len(self.round_starts())} rounds x "
                f"mix_per_round={self.hparams.mix_per_round} = {need} queries exceed query_budget={budget}"
            )

    def on_train_epoch_start(self) -> None:
        starts = self.round_starts()
        while self.rounds_done < len(starts) and self.current_epoch >= starts[self.rounds_done]:
            self.select_mixes()
            self.rounds_done += 1

    def candidates(self, n: int) -> torch.Tensor:
        """Up to ``candidate_pairs`` pairs (i, i - k mod n), k = 1, 2, ..., not already chosen."""
        chosen = {tuple(p) for p in self.mix_pairs.tolist()}
        out: list[tuple[int, int]] = []
        for k in range(1, n):
            for i in range(n):
                pair = (i, (i - k) % n)
                if pair not in chosen:
                    out.append(pair)
                    if len(out) == self.hparams.candidate_pairs:
                        return torch.tensor(out)
        return torch.tensor(out, dtype=torch.long).view(-1, 2)

    @torch.no_grad()
    def score(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair: the weight whose mix the student is least sure of, and that top probability."""
        w = self.WEIGHTS.to(a.device)
        mixes = w.view(-1, 1, 1, 1, 1) * a + (1 - w.view(-1, 1, 1, 1, 1)) * b  # W x N x C x H x W
        top = torch.stack([F.softmax(self(m), -1).max(-1).values for m in mixes])  # W x N
        best = top.argmin(0)
        return w[best], top.gather(0, best.view(1, -1)).squeeze(0)

    def mix(self, pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        a, b = self.pool_images(pairs[:, 0]), self.pool_images(pairs[:, 1])
        w = weights.to(a.device).view(-1, 1, 1, 1)
        return self.client.prepare(w * a + (1 - w) * b)

    def select_mixes(self) -> None:
        hp = self.hparams
        pairs = self.candidates(len(self.pool_dataset()))
        if not len(pairs):
            return
        was = self.net.training
        self.net.eval()
        ws, tops = [], []
        for part in pairs.split(hp.score_batch):
            w, top = self.score(self.pool_images(part[:, 0]), self.pool_images(part[:, 1]))
            ws.append(w.cpu())
            tops.append(top.cpu())
        self.net.train(was)
        order = torch.cat(tops).argsort()[: hp.mix_per_round]
        new_pairs, new_w = pairs[order], torch.cat(ws)[order]
        answers = torch.cat([self.client.query(self.mix(p, w)).float().cpu() for p, w in
                             zip(new_pairs.split(256), new_w.split(256))])  # fmt: skip
        self.mix_pairs = torch.cat([self.mix_pairs, new_pairs])
        self.mix_weights = torch.cat([self.mix_weights, new_w])
        self.mix_answers = torch.cat([self.mix_answers.view(-1, answers.shape[1]), answers])
        self.log("am/mixed_images", float(len(self.mix_pairs)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self.client.prepare(batch["image"].detach())
        p = self.client.query(x).float()
        m = len(self.mix_pairs)
        if m:
            k = max(1, round(len(x) * m / len(self.pool_dataset())))
            pick = torch.randint(0, m, (k,))
            x = torch.cat([x, self.mix(self.mix_pairs[pick], self.mix_weights[pick])])
            p = torch.cat([p, self.mix_answers[pick].to(p.device)])
        loss = soft_cross_entropy(self(x), p.to(x.device))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["active_mixup"] = {
            "pairs": self.mix_pairs,
            "weights": self.mix_weights,
            "answers": self.mix_answers,
            "rounds_done": self.rounds_done,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("active_mixup")
        if state is not None:
            self.mix_pairs, self.mix_weights = state["pairs"], state["weights"]
            self.mix_answers, self.rounds_done = state["answers"], int(state["rounds_done"])


__all__ = ["AM"]
