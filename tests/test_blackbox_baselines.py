"""MEKD's compared methods (KN, AL, DAFL, AM, DB3KD): losses by hand, query accounting and budgets, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kd_lightning.data import DigitsEdgeCloud, QueryPoolDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import (
    boundary_kl,
    boundary_soft_labels,
    dafl_losses,
    discriminator_loss,
    fool_loss,
    soft_cross_entropy,
    tempered_kl,
)
from kd_lightning.methods import AL, AM, DAFL, DB3KD, KN
from kd_lightning.teachers.blackbox import QueryBudgetExceeded
from tests.blackbox_helpers import digits8_teacher  # noqa: F401  (module-scoped fixture)
from tests.helpers import QUIET, RECIPES, make_fake_mnist, quiet_trainer

DIGITS = dict(num_classes=10, in_channels=1, image_size=8, mean=(0.3053,), std=(0.3760,), net="tinynet")


def pool(kind: str = "local", size: int = 32, batch: int = 16, **kw) -> QueryPoolDataModule:
    local = DigitsEdgeCloud(part="edge", augment=False)
    return QueryPoolDataModule(local, pool=kind, pool_size=size, batch_size=batch, **kw)


def stats(root: Path) -> dict:
    return json.loads((root / "queries" / "stats.json").read_text())


# ---------------------------------------------------------------------------- golden losses
def test_tempered_kl_by_hand() -> None:
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    T = 2.0
    p = [math.exp(v / T) for v in (0.0, 2.0, 0.0)]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / T) for v in (1.0, 0.0, -1.0)]
    q = [v / sum(q) for v in q]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert tempered_kl(s, t, T, "tau").item() == pytest.approx(kl * T, rel=1e-5)
    assert tempered_kl(s, t, T, "tau2").item() == pytest.approx(kl * T * T, rel=1e-5)
    assert tempered_kl(s, t, T, "none").item() == pytest.approx(kl, rel=1e-5)


def test_soft_cross_entropy_by_hand() -> None:
    s, p = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]])
    # log softmax = (log 1/4, log 3/4)
    assert soft_cross_entropy(s, p).item() == pytest.approx(-0.5 * (math.log(0.25) + math.log(0.75)), rel=1e-6)


def test_adversarial_losses_by_hand() -> None:
    dt, ds = torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want_d = -(math.log(sig(0.0)) + math.log(sig(2.0))) / 2 - (math.log(1 - sig(1.0)) + math.log(1 - sig(-1.0))) / 2
    assert discriminator_loss(dt, ds).item() == pytest.approx(want_d, rel=1e-6)
    assert fool_loss(ds).item() == pytest.approx(-(math.log(sig(1.0)) + math.log(sig(-1.0))) / 2, rel=1e-6)


def test_dafl_losses_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # probs (1/4, 3/4) and (3/4, 1/4)
    feats = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    parts = dafl_losses(logits, feats)
    assert parts["one_hot"].item() == pytest.approx(-math.log(0.75), rel=1e-6)  # argmax is each row's 3/4 class
    assert parts["activation"].item() == pytest.approx(-1.5)
    assert parts["entropy"].item() == pytest.approx(2 * 0.5 * math.log10(0.5), rel=1e-6)  # batch mean (1/2, 1/2)


def test_boundary_soft_labels_and_kl_by_hand() -> None:
    d = torch.tensor([[7.0, 2.0, 4.0, float("inf")]])  # own class 0: its entry is ignored; class 3 never reached
    scores = boundary_soft_labels(d, torch.tensor([0]))
    torch.testing.assert_close(scores, torch.tensor([[0.75, 0.5, 0.25, 0.0]]))
    s = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    T = 20.0
    p = torch.softmax(scores, -1)[0].tolist()
    q = torch.softmax(s / T, -1)[0].tolist()
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert boundary_kl(s, scores, T).item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("cls", [KN, AL, AM])
def test_soft_answer_methods_refuse_hard_answers(cls: type) -> None:
    with pytest.raises(ConfigError, match=rf"{cls.__name__} needs soft answers .*responses='hard'"):
        cls(teacher="x", responses="hard", **DIGITS)


def test_db3kd_is_decision_based_and_dafl_white_box() -> None:
    with pytest.raises(ConfigError, match="DB3KD needs hard answers"):
        DB3KD(teacher="x", responses="soft", **DIGITS)
    with pytest.raises(ConfigError, match=r"DAFL is white-box.*not a URL"):
        DAFL(teacher="http://127.0.0.1:1", **DIGITS)


# ---------------------------------------------------------------------------- KN
def test_kn_builds_its_transfer_set_up_front_and_a_resume_pays_nothing(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    m = KN(teacher=str(digits8_teacher), transfer_size=20, query_budget=20, **DIGITS)
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1).fit(m, pool(size=32))
    s = stats(tmp_path)
    assert s["journal_spent"] == 20 and s["images_paid"] == 20  # the transfer set, once; epochs read the journal
    assert int((~m.transfer[:, 0].isnan()).sum()) == 20
    again = KN(teacher=str(digits8_teacher), transfer_size=20, query_budget=20, **DIGITS)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(again, pool(size=32))
    s = stats(tmp_path)
    assert s["images_paid"] == 0 and s["images_from_journal"] >= 20 and s["journal_spent"] == 20
    with pytest.raises(QueryBudgetExceeded, match="transfer set of 32 images exceeds query_budget=20"):
        over = KN(teacher=str(digits8_teacher), query_budget=20, journal="", **DIGITS)
        quiet_trainer(tmp_path / "over", max_steps=1, limit_val_batches=0).fit(over, pool(size=32))


# ---------------------------------------------------------------------------- AL
@pytest.mark.parametrize("adversarial", ["official", "minimax"])
def test_al_trains_student_and_discriminator_on_paid_answers(
    adversarial: str,
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    m = AL(teacher=str(digits8_teacher), adversarial=adversarial, query_budget=32, **DIGITS)
    d0 = [p.detach().clone() for p in m.discriminator.parameters()]
    s0 = [p.detach().clone() for p in m.net.parameters()]
    quiet_trainer(tmp_path, max_steps=8, limit_val_batches=1).fit(
        m, pool(size=32)
    )  # 2 optimisers x 4 batches: 2 epochs
    assert stats(tmp_path)["journal_spent"] == 32  # the second epoch is answered by the journal
    assert any(not torch.equal(a, b) for a, b in zip(d0, m.discriminator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(s0, m.net.parameters()))


def test_al_minimax_student_fools_while_official_shares_the_discriminator_loss() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    for mode in ("official", "minimax"):
        m = AL(teacher="x", adversarial=mode, **DIGITS)
        parts, d = m.al_parts(s, t)
        dt, ds = m.discriminator(t), m.discriminator(s)
        adv = 0.15 * (fool_loss(ds) if mode == "minimax" else discriminator_loss(dt, ds))
        torch.testing.assert_close(parts["adv"], adv)
        torch.testing.assert_close(parts["kl"], 0.5 * tempered_kl(s, t, 2.0, "tau"))
        torch.testing.assert_close(d, discriminator_loss(dt, ds) * (0.15 if mode == "official" else 1.0))


# ---------------------------------------------------------------------------- DAFL
def test_dafl_trains_generator_and_student_white_box_within_its_budget(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    m = DAFL(teacher=str(digits8_teacher), z_dim=16, query_budget=48, **DIGITS)
    g0 = [p.detach().clone() for p in m.generator.parameters()]
    t0 = {k: v.clone() for k, v in m.white_teacher.state_dict().items()}
    quiet_trainer(tmp_path, max_steps=6, limit_val_batches=1).fit(m, pool("latent", size=48))  # 2 optimisers x 3
    assert m.shown == 48
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.generator.parameters()))
    assert all(torch.equal(t0[k], v) for k, v in m.white_teacher.state_dict().items())  # the teacher stays frozen
    over = DAFL(teacher=str(digits8_teacher), z_dim=16, query_budget=40, **DIGITS)
    with pytest.raises(QueryBudgetExceeded, match="exceed query_budget=40 \\(32 shown\\)"):
        quiet_trainer(tmp_path / "o", max_steps=6, limit_val_batches=0).fit(over, pool("latent", size=48))


# ---------------------------------------------------------------------------- AM
def test_am_adds_the_most_uncertain_mixes_each_round_and_pays_for_them_once(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    kw = dict(round_epochs=[1, 1, 1], mix_per_round=6, candidate_pairs=40, query_budget=32 + 12, **DIGITS)
    m = AM(teacher=str(digits8_teacher), **kw)
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=1)
    trainer.fit(m, pool(size=32))
    assert len(m.mix_pairs) == 12 and m.rounds_done == 2
    assert len({tuple(p) for p in m.mix_pairs.tolist()}) == 12  # a pair is never chosen twice
    assert ((m.mix_weights >= 0.3 - 1e-6) & (m.mix_weights <= 0.7 + 1e-6)).all()
    assert stats(tmp_path)["journal_spent"] == 44
    trainer.save_checkpoint(tmp_path / "am.ckpt")
    resumed = AM(teacher=str(digits8_teacher), **kw)
    quiet_trainer(tmp_path, max_epochs=4, limit_val_batches=0).fit(
        resumed, pool(size=32), ckpt_path=tmp_path / "am.ckpt"
    )
    assert torch.equal(resumed.mix_pairs, m.mix_pairs) and stats(tmp_path)["images_paid"] == 0
    with pytest.raises(ConfigError, match="exceed query_budget=40"):
        small = AM(teacher=str(digits8_teacher), **{**kw, "query_budget": 40, "journal": ""})
        quiet_trainer(tmp_path / "s", max_epochs=1, limit_val_batches=0).fit(small, pool(size=32))


# ---------------------------------------------------------------------------- DB3KD
def test_db3kd_labels_from_boundaries_counts_its_queries_and_stops_at_the_budget(
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    cost = 9 * 2 * 3  # (C - 1) x n_starts x search_steps, the most one image can cost
    budget = 32 + 3 * cost + 10  # the pool's labels, then room for three images
    m = DB3KD(teacher=str(digits8_teacher), responses="hard", n_starts=2, search_steps=3, query_budget=budget, **DIGITS)
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1).fit(m, pool(size=32, batch=8))
    labelled = int((~m.scores[:, 0].isnan()).sum())
    assert m.exhausted and labelled == 3
    s = stats(tmp_path)
    assert 32 < s["journal_spent"] <= budget
    rows = m.scores[~m.scores[:, 0].isnan()]
    own = m.labels[~m.scores[:, 0].isnan()]
    torch.testing.assert_close(rows.gather(1, own.view(-1, 1)).squeeze(1), rows.sum(1) / 2)  # own = sum of others
    with pytest.raises(QueryBudgetExceeded, match="DB3KD: labelling 8 more images"):
        strict = DB3KD(
            teacher=str(digits8_teacher), responses="hard", n_starts=2, search_steps=3, query_budget=budget,
            on_budget="raise", journal="", **DIGITS,
        )  # fmt: skip
        quiet_trainer(tmp_path / "r", max_steps=1, limit_val_batches=0).fit(strict, pool(size=32, batch=8))


def test_db3kd_resume_reads_every_probe_from_the_journal(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    kw = dict(teacher=str(digits8_teacher), responses="hard", n_starts=1, search_steps=2, **DIGITS)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(DB3KD(**kw), pool(size=16, batch=4))
    spent = stats(tmp_path)["journal_spent"]
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(DB3KD(**kw), pool(size=16, batch=4))
    s = stats(tmp_path)
    assert s["images_paid"] == 0 and s["journal_spent"] == spent  # same pool, same starts, same probes: all journalled


# ---------------------------------------------------------------------------- recipes
FASHION = RECIPES / "mekd" / "fashion_mnist"
#: recipe -> extra arguments for a toy run (a pool of 40 fake images)
BASELINE_RECIPES = {
    "kn": ["--model.init_args.transfer_size", "40"],
    "kn_adaptive": ["--model.init_args.transfer_size", "40", "--model.init_args.adaptive_batch", "8"],
    "al": [],
    "dafl": [],
    "am": [],
    "db3kd": ["--model.init_args.search_steps", "2"],
}


def test_fashion_baselines_run(kdl, tmp_path: Path) -> None:
    make_fake_mnist(tmp_path / "fm", n_train=200, n_test=40)
    edge = ["--data.init_args.edge_size", "40", "--data.init_args.edge_val_size", "20", "--data.init_args.root", "fm"]
    local = [a.replace("--data.init_args.", "--data.init_args.local.init_args.") for a in edge]
    teacher = ["--model.init_args.net", "tinynet", "--trainer.max_epochs", "1", *QUIET, *edge]
    assert kdl("fit", "--config", str(FASHION / "teacher.yaml"), *teacher) == 0
    for name, extra in BASELINE_RECIPES.items():
        args = ["--trainer.fast_dev_run", "1", "--data.init_args.pool_size", "40", *QUIET, *local, *extra]
        assert kdl("fit", "--config", str(FASHION / f"{name}.yaml"), *args) == 0, name
        if name != "dafl":  # DAFL shows its images to a white-box teacher: no query client, no journal
            spent = json.loads((tmp_path / f"runs/mekd/fashion_mnist/{name}/queries/stats.json").read_text())
            assert 0 < spent["journal_spent"] <= spent["query_budget"], (name, spent)


@pytest.mark.parametrize("name", sorted(BASELINE_RECIPES))
def test_fashion_mnist_baseline_recipes_fit_their_budget(name: str) -> None:
    import yaml

    cfg = yaml.safe_load((FASHION / f"{name}.yaml").read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    method = name.split("_")[0]  # kn_adaptive is KN with policy: adaptive
    assert cfg["model"]["class_path"] == method.upper() and cfg["seed_everything"] == 0
    rounds = len(model.get("round_epochs", [])) - 1
    needed = {"kn": model.get("transfer_size"), "am": data["pool_size"] + rounds * model.get("mix_per_round", 0)}
    if method in needed:
        assert needed[method] == model["query_budget"]
    assert ("hard" if name == "db3kd" else "soft") == model.get("responses", "soft")


TEMPLATES = sorted((RECIPES / "mekd" / "baselines").glob("*.yaml"))


@pytest.mark.parametrize("recipe", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_baseline_templates(recipe: Path, kdl, capsys) -> None:
    """The CIFAR-10 and Syn Digits -> SVHN templates resolve to the method on MobileNetV2 with the setting's data."""
    import yaml

    assert kdl("fit", "--config", str(recipe), "--print_config") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    model, data = cfg["model"], cfg["data"]
    method = recipe.stem.rsplit("_", 1)[1].upper()
    assert model["class_path"].endswith(f".{method}") and model["init_args"]["net"] == "mobilenetv2"
    local = "SVHNDataModule" if recipe.stem.startswith("syn_digits") else "CIFAR10DataModule"
    assert data["init_args"]["local"]["class_path"].endswith(local)
    assert data["init_args"]["pool"] == ("latent" if method == "DAFL" else "local")
