"""KN's adaptive policy (Knockoff Nets' gradient bandit): the update by hand, rewards, budget, resume, bad options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.data import DigitsEdgeCloud, QueryPoolDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.methods import KN
from kd_lightning.methods.blackbox_baselines.knockoff import (
    GradientBandit,
    RunningStandardizer,
    certainty_reward,
    diversity_reward,
    loss_reward,
)
from kd_lightning.teachers.blackbox import QueryBudgetExceeded
from tests.blackbox_helpers import digits8_teacher  # noqa: F401  (module-scoped fixture)
from tests.helpers import quiet_trainer

DIGITS = dict(num_classes=10, in_channels=1, image_size=8, mean=(0.3053,), std=(0.3760,), net="tinynet")


def pool(size: int = 40, batch: int = 8) -> QueryPoolDataModule:
    return QueryPoolDataModule(
        DigitsEdgeCloud(part="edge", augment=False), pool="local", pool_size=size, batch_size=batch
    )


def stats(root: Path) -> dict:
    return json.loads((root / "queries" / "stats.json").read_text())


def adaptive(teacher: Path, **kw) -> KN:
    L.seed_everything(0)
    return KN(teacher=str(teacher), policy="adaptive", **{**DIGITS, **kw})


# ---------------------------------------------------------------------------- the bandit by hand
def test_gradient_bandit_raises_the_rewarded_action_by_the_rule() -> None:
    b = GradientBandit(3)
    assert b.update(1, 0.0) == 0.0  # the first reward is its own baseline: no change
    torch.testing.assert_close(b.H, torch.zeros(3, dtype=torch.float64))
    assert b.update(0, 1.0) == 1.0  # baseline 0 (the mean before), step 1 / N(0) = 1, pi uniform
    torch.testing.assert_close(b.H, torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64))
    p = b.probs()
    want = math.exp(2 / 3) / (math.exp(2 / 3) + 2 * math.exp(-1 / 3))
    assert p[0].item() == pytest.approx(want) and p[0] > 1 / 3 > p[1]
    # a reward below the baseline (mean 0.5) lowers the action drawn: step 1 / N(2) = 1
    pi = b.probs()
    b.update(2, -0.5)
    assert b.H[2].item() == pytest.approx(-1 / 3 + (-1.0) * (1 - pi[2].item()))
    assert b.H[0].item() == pytest.approx(2 / 3 + 1.0 * pi[0].item())
    assert b.baseline == pytest.approx(0.5 / 3)


def test_gradient_bandit_fixed_step_and_unavailable_actions_keep_their_preference() -> None:
    b = GradientBandit(3, lr=0.5)
    b.update(0, 0.0)
    mask = torch.tensor([True, True, False])
    b.update(1, 2.0, mask)  # drawn among actions 0 and 1: pi = (1/2, 1/2, 0)
    torch.testing.assert_close(b.H, torch.tensor([-0.5, 0.5, 0.0], dtype=torch.float64))
    assert b.probs(mask)[2] == 0


def test_gradient_bandit_learns_the_best_arm() -> None:
    g = torch.Generator().manual_seed(0)
    b = GradientBandit(4, lr=0.1)
    for _ in range(400):
        a = int(torch.multinomial(b.probs().float(), 1, generator=g))
        b.update(a, float(a == 2) + 0.1 * float(torch.randn(1, generator=g)))
    assert int(b.probs().argmax()) == 2 and b.probs()[2] > 0.5


def test_rewards_by_hand() -> None:
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    torch.testing.assert_close(certainty_reward(p), torch.tensor([0.3, 0.25]))
    recent = torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.6, 0.3]])  # mean (0.55, 0.3, 0.15)
    assert diversity_reward(p[0], recent).item() == pytest.approx(0.3 + 0.15)
    s = torch.tensor([[0.0, math.log(2.0), 0.0]])  # softmax (1/4, 1/2, 1/4)
    want = -(0.1 * math.log(0.25) + 0.6 * math.log(0.5) + 0.3 * math.log(0.25))
    assert loss_reward(s, p[:1]).item() == pytest.approx(want, rel=1e-6)


def test_running_standardizer_by_hand() -> None:
    z = RunningStandardizer(2)
    torch.testing.assert_close(z(torch.tensor([1.0, 5.0])), torch.zeros(2, dtype=torch.float64))  # no spread yet
    out = z(torch.tensor([3.0, 5.0]))  # term 0: mean 2, std 1 -> (3 - 2) / 1; term 1 constant -> 0
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0], dtype=torch.float64))
    out = z(torch.tensor([2.0, 5.0]))  # term 0: values 1, 3, 2: mean 2 -> 0
    assert out[0].item() == pytest.approx(0.0)


# ---------------------------------------------------------------------------- a fit
def test_adaptive_kn_fits_on_digits_and_spends_exactly_its_budget(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    m = adaptive(digits8_teacher, transfer_size=32, query_budget=32, adaptive_batch=8)
    trainer = quiet_trainer(tmp_path, max_steps=8, limit_val_batches=1)  # 4 online steps, then 4 on the set
    trainer.fit(m, pool())
    s = stats(tmp_path)
    assert s["journal_spent"] == 32 == s["query_budget"] and s["images_paid"] == 32
    state = m.adaptive
    assert state is not None and state.done and state.collected == 32 and len(state.actions) == 32
    assert state.terms.shape == (32, 3) and torch.isfinite(state.terms).all() and torch.isfinite(state.history).all()
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert state.bandit.steps == 32 and not torch.equal(state.bandit.H, torch.zeros_like(state.bandit.H))
    # every draw took the class it asked for: the image's ground-truth class is the action's class
    labels = m.pool_labels()
    chosen = (~m.transfer[:, 0].isnan()).nonzero().flatten()
    assert sorted(state.classes[state.actions].tolist()) == sorted(labels[chosen].tolist())


def test_adaptive_kn_refuses_a_transfer_set_over_the_budget(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    m = adaptive(digits8_teacher, transfer_size=24, query_budget=20, journal="")
    with pytest.raises(QueryBudgetExceeded, match="transfer set of 24 images exceeds query_budget=20"):
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(m, pool())


def test_adaptive_kn_stops_at_a_budget_shared_with_an_earlier_run(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    """A journal that already holds other paid images: the collection stops when the budget is spent."""
    first = KN(teacher=str(digits8_teacher), transfer_size=12, query_budget=40, **DIGITS)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(first, pool())
    assert stats(tmp_path)["journal_spent"] == 12
    m = adaptive(digits8_teacher, transfer_size=20, query_budget=20, adaptive_batch=6)
    with pytest.warns(UserWarning, match="query_budget=20 is spent"):
        quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0).fit(m, pool())
    s = stats(tmp_path)
    assert s["journal_spent"] == 20  # never past the budget
    assert m.adaptive is not None and m.adaptive.done and m.adaptive.collected < 20


class Killed(Exception):
    pass


class Kill(L.Callback):
    """Save a checkpoint after step ``save_at``, then die after step ``kill_at`` (as a killed process would)."""

    def __init__(self, path: Path, save_at: int, kill_at: int) -> None:
        self.path, self.save_at, self.kill_at = path, save_at, kill_at

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)
        if trainer.global_step == self.kill_at:
            raise Killed


def test_adaptive_kn_resumed_after_a_kill_pays_nothing_twice_and_draws_the_same(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    kw = dict(transfer_size=24, query_budget=24, adaptive_batch=4)  # 6 online steps
    whole = adaptive(digits8_teacher, **kw)
    quiet_trainer(tmp_path / "whole", max_steps=6, limit_val_batches=0).fit(whole, pool())

    ckpt = tmp_path / "killed" / "step2.ckpt"
    killed = adaptive(digits8_teacher, **kw)
    with pytest.raises(Killed):
        quiet_trainer(tmp_path / "killed", max_steps=6, limit_val_batches=0, callbacks=[Kill(ckpt, 2, 4)]).fit(
            killed, pool()
        )
    assert killed.link.client is not None
    paid_before = killed.link.client.spent
    killed.link.close()  # the process is gone: its journal file is closed
    assert paid_before == 16  # 4 steps x 4 images paid; the checkpoint knows the first 8
    resumed = adaptive(digits8_teacher, **kw)
    quiet_trainer(tmp_path / "killed", max_steps=6, limit_val_batches=0).fit(resumed, pool(), ckpt_path=ckpt)
    s = stats(tmp_path / "killed")
    assert s["images_paid"] == 24 - 16 and s["journal_spent"] == 24  # steps 3-4 read from the journal
    assert s["images_from_journal"] >= 8
    assert whole.adaptive is not None and resumed.adaptive is not None
    torch.testing.assert_close(resumed.transfer, whole.transfer, equal_nan=True)
    assert torch.equal(resumed.adaptive.actions, whole.adaptive.actions)
    torch.testing.assert_close(resumed.adaptive.bandit.H, whole.adaptive.bandit.H)


# ---------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"policy": "greedy"}, r"policy='greedy'; expected one of 'random', 'adaptive'"),
        ({"adaptive_batch": 0}, r"adaptive_batch=0, .*expected >= 1"),
        ({"diversity_window": 0}, r"diversity_window=0"),
        ({"bandit_lr": 0.0}, r"bandit_lr=0.0"),
        ({"rewards": []}, r"rewards=\[\]; expected a non-empty list"),
        ({"rewards": ["certainty", "novelty"]}, r"rewards=\['certainty', 'novelty'\]"),
        ({"rewards": ["loss", "loss"]}, r"distinct names"),
        ({"policy": "adaptive", "responses": "hard"}, r"KN needs soft answers .*responses='hard'"),
    ],
)
def test_bad_adaptive_options_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        KN(teacher="x", **{**DIGITS, **kw})


def test_adaptive_kn_refuses_a_pool_without_classes(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    class Unlabelled(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = pool()
            for key in ("num_classes", "in_channels", "image_size", "mean", "std", "task", "label_range", "pool"):
                setattr(self, key, getattr(self.inner, key))

        def setup(self, stage: str | None = None) -> None:
            self.inner.setup(stage)
            self.train_dataset = self.inner.train_dataset

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return self.inner.train_dataloader()

    m = adaptive(digits8_teacher, transfer_size=8, journal="")
    with pytest.raises(ConfigError, match="draws pool images by class"):
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(m, Unlabelled())
