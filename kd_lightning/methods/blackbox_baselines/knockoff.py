"""KN: Knockoff Nets (Orekondy et al., CVPR 2019) against the black box: the random and the adaptive policy."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import KLScale, tempered_kl
from kd_lightning.methods.blackbox_baselines.base import PoolBaseline, need_responses
from kd_lightning.methods.blackbox_baselines.knockoff_adaptive import (
    REWARDS,
    AdaptiveState,
    GradientBandit,
    Reward,
    RunningStandardizer,
    certainty_reward,
    diversity_reward,
    loss_reward,
)
from kd_lightning.methods.blackbox_student import answer_logits, check_choice
from kd_lightning.teachers.client import QueryBudgetExceeded

Policy = Literal["random", "adaptive"]
STATE_KEY = "knockoff_adaptive"  # the adaptive policy's state in a checkpoint


class KN(PoolBaseline):
    """Knockoff Nets (Orekondy et al., CVPR 2019): a transfer set of ``transfer_size`` pool images, then KD on it.

    ``policy: random`` (the default, as MEKD's ``KN.py`` runs it): the transfer set is drawn at random (seeded, no
    replacement) and queried up front at fit start, in requests of ``build_batch`` images.

    ``policy: adaptive`` (the paper's bandit): the actions are the classes of the pool images (a flat, one-level
    hierarchy: Fashion-MNIST has no label tree). Each of the first training steps draws ``adaptive_batch`` classes
    from ``softmax(H)``, takes an unqueried pool image of each at random, queries them in one request, trains the
    student on the answers (online) and updates ``H`` by the gradient-bandit rule with the sum of the normalised
    ``rewards`` (:class:`AdaptiveState`). Once the transfer set is full (or no class has an unqueried image left,
    or the budget is spent), the run goes on as the random policy does, on the transfer set collected. The
    classes come from the pool's ground-truth labels, which Knockoff Nets assumes the adversary knows for its own
    images; they choose what to query and are never a training target. The bandit's state is checkpointed, and its
    draws use its own seeded generator, so a run resumed from a checkpoint draws the same images again and the
    journal answers them without paying.

    Either way the student learns ``tau-scaled KL(softmax(t / T) || softmax(s / T))`` on the transfer set only,
    each image seen under a fresh random crop (``augment``) while its answer stays the one paid for. Soft answers
    only (the certainty reward is the margin of the top two probabilities).

    Args:
        transfer_size: images in the transfer set (``None``: the whole pool); must fit in ``query_budget``.
        policy: ``"random"`` or ``"adaptive"``.
        policy_seed: seed of the policy's draws.
        T: temperature (MEKD code: 5).
        kl_scale: factor of the KL: ``"tau"`` (MEKD code), ``"tau2"`` or ``"none"``.
        augment: random crops (padding 1/8 of the side) of the transfer images during training (the adaptive
            policy's online steps train on the images as queried).
        build_batch: images per request while building the random transfer set.
        adaptive_batch: images drawn, queried and learnt per online step of the adaptive policy (paper: 1).
        rewards: the adaptive policy's reward terms, summed after normalisation (paper's best: all three).
        diversity_window: answers in the running mean the diversity reward compares with (the paper's Delta).
        bandit_lr: the bandit's step size; ``None``: 1 / (times the action was drawn).
        **kwargs: see :class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent`.
    """

    def __init__(
        self,
        transfer_size: int | None = None,
        policy: Policy = "random",
        policy_seed: int = 0,
        T: float = 5.0,
        kl_scale: KLScale = "tau",
        augment: bool = True,
        build_batch: int = 256,
        adaptive_batch: int = 32,
        rewards: list[Reward] | None = None,
        diversity_window: int = 25,
        bandit_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        need_responses(kwargs.get("responses", "soft"), "soft", "KN")
        check_choice("policy", policy, ("random", "adaptive"))
        if (transfer_size is not None and transfer_size < 1) or T <= 0 or build_batch < 1:
            raise ConfigError(
                f"transfer_size={transfer_size}, T={T}, build_batch={build_batch}; expected >= 1 (or null), > 0, >= 1"
            )
        if adaptive_batch < 1 or diversity_window < 1 or (bandit_lr is not None and bandit_lr <= 0):
            raise ConfigError(
                f"adaptive_batch={adaptive_batch}, diversity_window={diversity_window}, bandit_lr={bandit_lr}; "
                "expected >= 1, >= 1 and > 0 (or null)"
            )
        chosen = list(REWARDS if rewards is None else rewards)
        if not chosen or len(set(chosen)) != len(chosen) or any(r not in REWARDS for r in chosen):
            raise ConfigError(f"rewards={rewards!r}; expected a non-empty list of distinct names from {list(REWARDS)}")
        super().__init__(**kwargs)
        self.transfer: torch.Tensor | None = None  # N x C answers (NaN outside the transfer set), rebuilt each fit
        self.adaptive: AdaptiveState | None = None
        self._loaded: dict[str, Any] | None = None  # the adaptive state read from a checkpoint, until on_fit_start

    # ------------------------------------------------------------------ the transfer set
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
        if self.hparams.policy == "adaptive":
            self.start_adaptive(n)
            return
        chosen = self.transfer_indices(n)
        self.check_budget(len(chosen))
        answers = torch.full((n, int(self.hparams.num_classes)), float("nan"))
        for part in chosen.split(self.hparams.build_batch):
            x = self.client.prepare(self.pool_images(part))
            answers[part] = self.client.query(x).float().cpu()
        self.transfer = answers

    def check_budget(self, size: int) -> None:
        """Refuse a transfer set over the budget before sending anything."""
        budget = self.client.query_budget
        if budget is not None and size > budget:
            raise QueryBudgetExceeded(
                f"KN: a transfer set of {size} images exceeds query_budget={budget}; "
                "lower transfer_size or raise the budget"
            )

    def pool_labels(self) -> torch.Tensor:
        """The class of every pool item (item j is a view of local image j mod n): the adaptive policy's actions."""
        from kd_lightning.data.utils import dataset_labels

        dm = getattr(self.trainer, "datamodule", None)
        local = getattr(getattr(dm, "local", None), "train_dataset", None)
        if local is None:
            raise ConfigError(
                "KN policy='adaptive' draws pool images by class: give it a QueryPoolDataModule (pool: local)"
            )
        labels = dataset_labels(local).long()
        return labels[torch.arange(len(self.pool_dataset())) % len(labels)]

    def start_adaptive(self, n: int) -> None:
        hp = self.hparams
        size = hp.transfer_size or n
        if size > n:
            raise ConfigError(f"KN: transfer_size={size} but the pool holds {n} images")
        self.check_budget(size)
        state = AdaptiveState(
            self.pool_labels(), int(hp.num_classes), size, hp.policy_seed, list(hp.rewards or REWARDS),
            hp.diversity_window, hp.bandit_lr,
        )  # fmt: skip
        if self._loaded is not None:
            state.load_state_dict(self._loaded)
            self._loaded = None
        self.adaptive, self.transfer = state, state.transfer

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        if self.adaptive is not None and not self.adaptive.done:
            return self.adaptive_step()
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

    def adaptive_step(self) -> torch.Tensor | None:
        """One online step of the adaptive policy: draw, query (within the budget), learn, reward, update H."""
        state = self.adaptive
        assert state is not None
        index, actions, masks = state.draw(self.hparams.adaptive_batch)
        answers = None
        while len(index):
            x = self.client.prepare(self.pool_images(index))
            try:
                answers = self.client.query(x).float()
                break
            except QueryBudgetExceeded:
                room = self.client.remaining or 0  # new images it may still pay for (journalled ones are free)
                if room >= len(index) or room == 0:
                    index = index[:0]
                else:
                    index, actions, masks = index[:room], actions[:room], masks[:room]
        if answers is None:
            state.done = True
            rank_zero_warn(
                f"KN: query_budget={self.client.query_budget} is spent ({self.client.spent} images paid, the "
                f"journal's earlier runs included); the adaptive transfer set stops at {state.collected} images"
            )
            return None
        logits = self(x)
        reward = state.learn(index, actions, masks, answers.cpu(), logits.detach().float().cpu())
        t = answer_logits(answers, "soft", self.hparams.num_classes).to(logits.device)
        loss = tempered_kl(logits, t, self.hparams.T, self.hparams.kl_scale)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/kl", loss.detach(), on_step=True, on_epoch=True)
        self.log_dict(
            {"kn/reward": reward, "kn/transfer": float(state.collected), "kn/policy_entropy": state.entropy()},
            on_step=True, on_epoch=False,
        )  # fmt: skip
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.adaptive is not None:
            checkpoint[STATE_KEY] = self.adaptive.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._loaded = checkpoint.get(STATE_KEY)


def random_crop(x: torch.Tensor) -> torch.Tensor:
    """Each image cropped at a random offset from a zero padding of 1/8 of its side (same size out)."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * pad + 1, (len(x), 2)).tolist()):
        out[i] = padded[i, :, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    return out


__all__ = [
    "KN",
    "AdaptiveState",
    "GradientBandit",
    "RunningStandardizer",
    "certainty_reward",
    "diversity_reward",
    "loss_reward",
    "random_crop",
]
