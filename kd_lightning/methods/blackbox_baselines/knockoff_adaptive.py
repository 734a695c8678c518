"""Knockoff Nets' adaptive policy as plain objects: the gradient bandit, the reward terms and the policy's state.

:class:`~kd_lightning.methods.blackbox_baselines.knockoff.KN` drives them (``policy: adaptive``); they hold no
Lightning and no teacher, so each is tested on hand-made tensors.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError

Reward = Literal["certainty", "diversity", "loss"]
REWARDS: tuple[Reward, ...] = ("certainty", "diversity", "loss")


class GradientBandit:
    """Softmax preferences ``H`` over actions, learnt by the gradient-bandit rule (Sutton & Barto, section 2.8).

    After action ``a`` earns reward ``r``: ``H += step * (r - baseline) * (onehot(a) - pi)``, where ``pi`` is the
    policy ``a`` was drawn from, ``baseline`` the mean of the rewards before this one (the first reward is its own
    baseline, so the first update is zero) and ``step`` is ``lr``, or ``1 / N(a)`` (times ``a`` was drawn) when
    ``lr`` is ``None``. Actions outside ``available`` have probability 0 and keep their preference.
    """

    def __init__(self, n_actions: int, lr: float | None = None) -> None:
        self.lr = lr
        self.H = torch.zeros(n_actions, dtype=torch.float64)
        self.counts = torch.zeros(n_actions, dtype=torch.long)
        self.steps = 0
        self.baseline = 0.0

    def probs(self, available: torch.Tensor | None = None) -> torch.Tensor:
        h = self.H if available is None else self.H.masked_fill(~available, float("-inf"))
        return torch.softmax(h, 0)

    def update(self, action: int, reward: float, available: torch.Tensor | None = None) -> float:
        """Learn from ``reward`` for ``action`` (drawn among ``available``); returns ``reward - baseline``."""
        pi = self.probs(available)
        if self.steps == 0:
            self.baseline = reward
        advantage = reward - self.baseline
        self.counts[action] += 1
        step = self.lr if self.lr is not None else 1.0 / float(self.counts[action])
        self.H -= step * advantage * pi
        self.H[action] += step * advantage
        self.steps += 1
        self.baseline += (reward - self.baseline) / self.steps
        return advantage

    def state_dict(self) -> dict[str, Any]:
        return {"H": self.H.clone(), "counts": self.counts.clone(), "steps": self.steps, "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.H, self.counts = state["H"].clone(), state["counts"].clone()
        self.steps, self.baseline = int(state["steps"]), float(state["baseline"])


class RunningStandardizer:
    """Each of K reward terms standardised by the mean and variance of all its values so far (this one included).

    While a term's variance is still 0 (its first value, or constant values) it gives 0.
    """

    def __init__(self, k: int) -> None:
        self.n = 0
        self.mean = torch.zeros(k, dtype=torch.float64)
        self.m2 = torch.zeros(k, dtype=torch.float64)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        v = values.double()
        self.n += 1
        delta = v - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (v - self.mean)
        std = (self.m2 / self.n).sqrt()
        return torch.where(std > 0, (v - self.mean) / std.clamp_min(1e-300), torch.zeros_like(v))

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.mean, self.m2 = int(state["n"]), state["mean"].clone(), state["m2"].clone()


def certainty_reward(p: torch.Tensor) -> torch.Tensor:
    """Per answer: the margin between the two largest probabilities."""
    top = p.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def diversity_reward(p: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """``sum_k max(0, p_k - mean_k)``: how much the answer ``p`` exceeds the mean of the ``recent`` answers."""
    return (p - recent.mean(0)).clamp_min(0).sum(-1)


def loss_reward(student: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per answer: the student's cross-entropy to the teacher's probabilities, ``-sum_k p_k log softmax(s)_k``."""
    return -(p * F.log_softmax(student, -1)).sum(-1)


class AdaptiveState:
    """The adaptive policy of Knockoff Nets on a pool with class labels (the actions): what it drew and learnt.

    Args:
        labels: the class of every pool item (only to choose which item to query).
        num_classes: answer width.
        size: images to collect.
        seed: seed of the draws.
        rewards: the reward terms to sum (each standardised over time by :class:`RunningStandardizer`).
        window: answers (the current one included) in the diversity reward's running mean.
        lr: the bandit's step size (``None``: ``1 / N(a)``).
    """

    def __init__(
        self,
        labels: torch.Tensor,
        num_classes: int,
        size: int,
        seed: int,
        rewards: list[Reward],
        window: int,
        lr: float | None,
    ) -> None:
        self.classes, self.action_of = labels.unique(return_inverse=True)
        self.size, self.rewards, self.window = size, rewards, window
        self.bandit = GradientBandit(len(self.classes), lr)
        self.scaler = RunningStandardizer(len(rewards))
        self.generator = torch.Generator().manual_seed(seed)
        self.transfer = torch.full((len(labels), num_classes), float("nan"))
        self.recent = torch.zeros(0, num_classes)
        self.actions = torch.zeros(0, dtype=torch.long)  # every action drawn and answered, in order
        self.history = torch.zeros(0, dtype=torch.float64)  # ... the reward it earned
        self.terms = torch.zeros(0, len(rewards), dtype=torch.float64)  # ... and its raw reward terms
        self.done = False

    @property
    def collected(self) -> int:
        return int((~self.transfer[:, 0].isnan()).sum())

    def free(self) -> torch.Tensor:
        return self.transfer[:, 0].isnan()

    def available(self, free: torch.Tensor) -> torch.Tensor:
        """Actions (classes) that still have an unqueried pool item."""
        return torch.bincount(self.action_of[free], minlength=len(self.classes)) > 0

    def entropy(self) -> float:
        p = self.bandit.probs(self.available(self.free()))
        return float(-(p * p.clamp_min(1e-300).log()).sum())

    def draw(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to ``k`` pool items, one per action drawn from the policy, with the actions and their draw masks.

        Fewer when the transfer set fills or no class has an unqueried item left (then the collection is done).
        """
        free = self.free()
        index, actions, masks = [], [], []
        for _ in range(min(k, self.size - self.collected)):
            mask = self.available(free)
            if not mask.any():
                break
            a = int(torch.multinomial(self.bandit.probs(mask).float(), 1, generator=self.generator))
            items = torch.nonzero(free & (self.action_of == a)).flatten()
            j = int(items[torch.randint(len(items), (1,), generator=self.generator)])
            free[j] = False
            index.append(j)
            actions.append(a)
            masks.append(mask)
        if not index:
            self.done = True
            return (
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, 0, dtype=torch.bool),
            )
        return torch.tensor(index), torch.tensor(actions), torch.stack(masks)

    def learn(
        self,
        index: torch.Tensor,
        actions: torch.Tensor,
        masks: torch.Tensor,
        answers: torch.Tensor,
        student: torch.Tensor,
    ) -> float:
        """Record the answers, then reward each draw in order and update the bandit; returns the mean reward."""
        self.transfer[index] = answers
        terms = {"certainty": certainty_reward(answers), "loss": loss_reward(student, answers)}
        total, raw = [], []
        for i in range(len(index)):
            self.recent = torch.cat([self.recent, answers[i : i + 1]])[-self.window :]
            terms_i = {**{k: v[i] for k, v in terms.items()}, "diversity": diversity_reward(answers[i], self.recent)}
            raw.append(torch.stack([terms_i[name] for name in self.rewards]).double())
            r = float(self.scaler(raw[-1]).sum())
            self.bandit.update(int(actions[i]), r, masks[i])
            total.append(r)
        self.actions = torch.cat([self.actions, actions])
        self.history = torch.cat([self.history, torch.tensor(total, dtype=torch.float64)])
        self.terms = torch.cat([self.terms, torch.stack(raw)])
        if self.collected >= self.size or not self.available(self.free()).any():
            self.done = True
        return sum(total) / len(total)

    def state_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes.clone(),
            "bandit": self.bandit.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "transfer": self.transfer.clone(),
            "recent": self.recent.clone(),
            "actions": self.actions.clone(),
            "history": self.history.clone(),
            "terms": self.terms.clone(),
            "done": self.done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not torch.equal(state["classes"], self.classes) or state["transfer"].shape != self.transfer.shape:
            raise ConfigError(
                f"the checkpoint's KN adaptive state is for a pool of {tuple(state['transfer'].shape)} answers over "
                f"classes {state['classes'].tolist()}; this pool gives {tuple(self.transfer.shape)} over "
                f"{self.classes.tolist()}: resume with the same data"
            )
        self.bandit.load_state_dict(state["bandit"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.transfer, self.recent = state["transfer"].clone(), state["recent"].clone()
        self.actions, self.history = state["actions"].clone(), state["history"].clone()
        self.terms = state["terms"].clone()
        self.done = bool(state["done"])


__all__ = [
    "REWARDS",
    "AdaptiveState",
    "GradientBandit",
    "Reward",
    "RunningStandardizer",
    "certainty_reward",
    "diversity_reward",
    "loss_reward",
]
