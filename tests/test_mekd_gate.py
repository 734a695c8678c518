"""Issue 29: MEKD's generator gate, the KD-on-G(z) control, L_IM's query plan, budgets shared across stages, and
hard answers' scale."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.callbacks import GateFailed, GeneratorGate
from kd_lightning.callbacks.generator_gate import gate_numbers, onehot_answers, run_gate
from kd_lightning.data import DigitsEdgeCloud, QueryPoolDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.methods import MEKD, BlackBoxKD
from kd_lightning.methods.mekd import answer_logits, im_queries
from tests.blackbox_helpers import digits8_teacher  # noqa: F401  (module-scoped fixture)
from tests.helpers import quiet_trainer
from tests.test_mekd import DIGITS, deprivatizer, generator_ckpt, pool  # noqa: F401  (module-scoped fixture)


# ---------------------------------------------------------------------------- a fake teacher/generator pair
class BinTeacher:
    """A fake black box: an image's class is its mean brightness in ten equal bins (soft: a peaked softmax)."""

    def __init__(self, soft: bool = True) -> None:
        self.soft, self.seen = soft, 0

    def query(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        cls = (images.flatten(1).mean(1) * 10).clamp(0, 9.999).floor().long()
        return F.softmax(F.one_hot(cls, 10).float() * 4, -1) if self.soft else cls


class Diverse(nn.Module):
    """Brightness uniform in [-1, 1] over z ~ N(0, 1): the teacher's classes come out evenly."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = 0.5 * (1 + torch.erf(z[:, :1] / 2**0.5))  # standard normal CDF: uniform in [0, 1]
        return (2 * u - 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)


class Collapsed(nn.Module):
    """The same grey image whatever z: one class."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full((len(z), 1, 8, 8), 0.3)


def test_gate_fails_on_a_collapsed_generator_and_passes_on_a_diverse_one() -> None:
    teacher = BinTeacher()
    bad = run_gate(Collapsed(), teacher, z_dim=10, num_classes=10, samples=500)
    assert not bad.passed and teacher.seen == 500
    assert bad.min_class_share == 0.0 and bad.entropy == pytest.approx(0.0, abs=1e-9)
    assert max(bad.class_shares) == 1.0
    msg = bad.message()
    assert "FAILED" in msg and "class share below 0.03" in msg and "normalised entropy 0.000 < 0.95" in msg
    good = run_gate(Diverse(), teacher, z_dim=10, num_classes=10, samples=2000)
    assert good.passed, good.message()
    assert good.min_class_share >= 0.08 and good.entropy > 0.99
    assert good.mean_confidence == pytest.approx(float(F.softmax(torch.tensor([4.0] + [0.0] * 9), -1)[0]), abs=1e-6)
    # hard answers: the same histogram, no confidence; a confidence threshold fails a soft teacher that hesitates
    hard = run_gate(Diverse(), BinTeacher(soft=False), z_dim=10, num_classes=10, samples=2000)
    assert hard.passed and hard.class_shares == good.class_shares and hard.mean_confidence != hard.mean_confidence
    unsure = gate_numbers(torch.full((20, 10), 0.1).index_fill(1, torch.tensor([0]), 0.2), 10, 0, 0, 0.5)
    assert not unsure.passed and unsure.failures == ["mean top probability 0.200 < 0.5"]


def test_onehot_answers_say_which_class_g_of_a_one_hot_looks_like() -> None:
    out = onehot_answers(Diverse(), BinTeacher(), num_classes=10, tau=5.0, scales=[1.0, 25.0])
    # the official input e_c / 5 sits near z = 0: every class gives the same mid-grey image, answered 5
    assert out["1.0"] == {"labels": [5] * 10, "self": 1, "distinct": 1}
    # a larger scale moves class 0's input far out (z[0] = 5): its image is white, answered 9
    assert out["25.0"]["labels"] == [9] + [5] * 9 and out["25.0"]["distinct"] == 2


def test_gate_callback_runs_under_test_logs_its_numbers_and_stops_a_failing_run(
    generator_ckpt: Path,  # noqa: F811
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    dm = DigitsEdgeCloud(part="edge", batch_size=16, augment=False)
    gate = GeneratorGate(samples=40, min_class_share=0.0, min_entropy=0.0, hard_scales=[1.0, 5.0])
    model = deprivatizer(digits8_teacher, im_batch_size=8, query_budget=64)
    trainer = quiet_trainer(tmp_path / "ok", callbacks=[gate], limit_test_batches=1)
    trainer.test(model, dm, ckpt_path=str(generator_ckpt))
    assert {"test/gate_min_class_share", "test/gate_entropy", "test/gate_passed"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["test/gate_passed"]) == 1.0
    report = json.loads((tmp_path / "ok" / "gate.json").read_text())
    assert report["samples"] == 40 and abs(sum(report["class_shares"]) - 1) < 1e-6
    assert set(report["onehot"]) == {"1.0", "5.0"} and len(report["onehot"]["1.0"]["labels"]) == 10
    stats = json.loads((tmp_path / "ok" / "queries" / "stats.json").read_text())
    assert stats["journal_spent"] == 40 + 20  # the gate's queries are paid and journalled in its own run folder
    # ten classes cannot each hold half of the answers: the run stops, naming the numbers
    strict = GeneratorGate(samples=40, min_class_share=0.5)
    trainer = quiet_trainer(tmp_path / "bad", callbacks=[strict], limit_test_batches=1)
    with pytest.raises(GateFailed, match=r"generator gate FAILED: class share below 0.5 .*min class share"):
        trainer.test(deprivatizer(digits8_teacher), dm, ckpt_path=str(generator_ckpt))
    assert json.loads((tmp_path / "bad" / "gate.json").read_text())["passed"] is False


def test_gate_at_fit_end(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    model = deprivatizer(digits8_teacher, im_batch_size=4, query_budget=200)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[
        GeneratorGate(samples=30, min_class_share=0.5, at_fit_end=True)])  # fmt: skip
    with pytest.raises(GateFailed):
        trainer.fit(model, DigitsEdgeCloud(part="edge", batch_size=16, augment=False))
    assert json.loads((tmp_path / "gate.json").read_text())["samples"] == 30


# ---------------------------------------------------------------------------- L_IM's queries
def test_im_queries_counts_the_paper_and_the_sparse_weighting() -> None:
    assert im_queries(4800, 64) == 307_200  # the paper: whole batch, every generator step
    assert im_queries(4800, 64, im_interval=100) == 3_072
    assert im_queries(600, 64, im_interval=25, im_batch_size=24) == 576  # the first evidence run's stage 1
    assert im_queries(4, 16, 1, 8) == 32


def test_deprivatization_refuses_to_start_when_l_im_would_overspend(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    model = deprivatizer(digits8_teacher, query_budget=100)  # paper weighting: 16 images x 10 generator steps
    trainer = quiet_trainer(tmp_path, max_steps=20, limit_val_batches=0)
    with pytest.raises(ConfigError, match=r"L_IM needs about 160 teacher queries for 10 generator steps"):
        trainer.fit(model, DigitsEdgeCloud(part="edge", batch_size=16, augment=False))
    assert "10 generator steps -> about 160 queries" in capsys.readouterr().out
    assert model.link.client is None  # closed again, nothing sent


# ---------------------------------------------------------------------------- the KD-on-G(z) control
def test_kd_on_gz_queries_the_images_mekd_sees_and_learns_by_hinton_kd(
    generator_ckpt: Path,  # noqa: F811
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    kw = dict(teacher=str(digits8_teacher), generator=str(generator_ckpt), net="tinynet", **DIGITS)
    kd = BlackBoxKD(method="kd", T=4.0, **kw)
    me = MEKD(**kw)
    assert kd.pool == me.pool == "latent" and BlackBoxKD(teacher="x", **DIGITS).pool == "local"
    z = torch.randn(5, 10)
    torch.testing.assert_close(kd.query_images({"z": z}), me.query_images({"z": z}))  # the very same images
    assert not any(p.requires_grad for p in kd.generator.parameters())
    with pytest.raises(ConfigError, match="queries pool='latent' but the data gives pool='local'"):
        quiet_trainer(tmp_path, max_steps=1).fit(kd, pool("local"))
    seen: list[torch.Tensor] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, i: int) -> None:
            seen.append(module.query_images(batch))

    kd = BlackBoxKD(method="kd", T=4.0, **kw)
    trainer = quiet_trainer(tmp_path / "fit", max_steps=2, limit_val_batches=1, callbacks=[Spy()])
    trainer.fit(kd, pool("latent", size=48))
    stats = json.loads((tmp_path / "fit" / "queries" / "stats.json").read_text())
    assert stats["journal_spent"] == 32 and len(seen) == 2
    s, p = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)
    pt = torch.softmax(p.log() / 4, -1)
    expect = (pt * (pt.log() - torch.log_softmax(s / 4, -1))).sum(1).mean() * 16
    torch.testing.assert_close(kd.distill_loss(torch.zeros(4, 1, 8, 8), s, p)["kd"], expect)


# ---------------------------------------------------------------------------- one budget over two stages
def test_spent_before_takes_stage_one_queries_off_the_pool_and_the_budget(
    generator_ckpt: Path,  # noqa: F811
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    stage1 = generator_ckpt.parent  # its queries/stats.json says 32 were paid
    dm = QueryPoolDataModule(
        DigitsEdgeCloud(part="edge", augment=False), pool="latent", pool_size=80, batch_size=16,
        spent_before=[str(stage1)],
    )  # fmt: skip
    model = MEKD(generator=str(generator_ckpt), teacher=str(digits8_teacher), net="tinynet", query_budget=80,
                 spent_before=[str(stage1 / "queries" / "stats.json")], **DIGITS)  # fmt: skip
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, dm)
    assert dm.pool_size == 48 and len(dm.train_dataset) == 48
    stats = json.loads((tmp_path / "queries" / "stats.json").read_text())
    assert stats["query_budget"] == 48 and stats["spent_before"] == 32 and stats["journal_spent"] == 48
    with pytest.raises(ConfigError, match=r"spent_before: '.*nowhere' gives no queries/stats.json"):
        QueryPoolDataModule(DigitsEdgeCloud(part="edge"), spent_before=[str(tmp_path / "nowhere")]).setup("fit")
    small = QueryPoolDataModule(DigitsEdgeCloud(part="edge"), pool_size=32, spent_before=[str(stage1)])
    with pytest.raises(ConfigError, match="already spent 32 queries: nothing is left"):
        small.setup("fit")


# ---------------------------------------------------------------------------- hard answers
def test_hard_scale_multiplies_the_one_hot_answer(generator_ckpt: Path, digits8_teacher: Path) -> None:  # noqa: F811
    kw = dict(generator=str(generator_ckpt), teacher=str(digits8_teacher), responses="hard", net="tinynet", **DIGITS)
    torch.manual_seed(0)
    s, y = torch.randn(3, 10), torch.tensor([1, 4, 7])
    x = torch.zeros(3, 1, 8, 8)
    official, scaled = MEKD(**kw), MEKD(hard_scale=5.0, **kw)
    g = official.generator
    for model, t in ((official, answer_logits(y, "hard", 10)), (scaled, 5 * answer_logits(y, "hard", 10))):
        parts = model.distill_loss(x, s, y)
        lf = (g(s / 5) - g(t / 5)).flatten(1).norm(p=1, dim=1).mean()
        kl = F.kl_div(F.log_softmax(s / 5, -1), F.softmax(t / 5, -1), reduction="batchmean") * 5
        torch.testing.assert_close(parts["lf"], lf)
        torch.testing.assert_close(parts["kl"], kl)
    with pytest.raises(ConfigError, match="hard_scale=0"):
        MEKD(hard_scale=0, **kw)
