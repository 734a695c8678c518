"""MEKD's stages and the black-box baselines: losses against hand computation, frozen generator, no labels."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data import DigitsEdgeCloud, QueryPoolDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.gans import MEKDDiscriminator, MEKDGenerator
from kd_lightning.methods import MEKD, BlackBoxKD, MEKDDeprivatization
from kd_lightning.methods.mekd import answer_logits
from kd_lightning.teachers import LocalTeacher
from tests.blackbox_helpers import digits8_teacher  # noqa: F401  (module-scoped fixture)
from tests.helpers import quiet_trainer

DIGITS = dict(num_classes=10, in_channels=1, image_size=8, mean=(0.3053,), std=(0.3760,))


def deprivatizer(teacher: Path, **kw) -> MEKDDeprivatization:
    kw.setdefault("g_ch", 8)
    kw.setdefault("d_ch", 8)
    return MEKDDeprivatization(teacher=str(teacher), **DIGITS, **kw)


@pytest.fixture(scope="module")
def generator_ckpt(digits8_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A deprivatization checkpoint after a few steps (soft answers, journal in the run folder)."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("gan")
    model = deprivatizer(digits8_teacher, im_batch_size=8, query_budget=64)
    trainer = quiet_trainer(root, max_steps=8, limit_val_batches=0)
    trainer.fit(model, DigitsEdgeCloud(part="edge", batch_size=16, augment=False))
    trainer.save_checkpoint(root / "gan.ckpt")
    return root / "gan.ckpt"


def pool(kind: str, size: int = 48, batch: int = 16) -> QueryPoolDataModule:
    return QueryPoolDataModule(DigitsEdgeCloud(part="edge", augment=False), pool=kind, pool_size=size, batch_size=batch)


def mekd(generator: Path, teacher: Path, **kw) -> MEKD:
    kw.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.05))
    return MEKD(generator=str(generator), teacher=str(teacher), net="tinynet", **DIGITS, **kw)


# ---------------------------------------------------------------------------- stage 1
def test_deprivatization_adds_alpha_l_im_and_pays_for_its_queries(
    digits8_teacher: Path,  # noqa: F811
    generator_ckpt: Path,
    tmp_path: Path,
) -> None:
    stats = (generator_ckpt.parent / "queries" / "stats.json").read_text()
    assert '"journal_spent": 32' in stats  # 4 generator steps x 8 queried images, all paid, all counted
    for responses in ("soft", "hard"):
        model = deprivatizer(digits8_teacher, responses=responses, alpha=0.5, im_batch_size=5, journal="")
        model.link.connect(10)
        z = torch.randn(6, 10)
        model.noise = lambda n, z=z: z[:n]  # type: ignore[method-assign]
        model.g_steps.fill_(0)
        loss = model.generator_step_loss({"image": torch.zeros(6, 1, 8, 8)})
        fake = model.generator(z)
        d = model.d_logits(fake, None)
        if responses == "soft":
            teacher = LocalTeacher(digits8_teacher, responses="soft")
            y = teacher.query(((fake[:5] + 1) / 2).clamp(0, 1)).max(-1).values
        else:
            y = torch.ones(5)
        expect = F.binary_cross_entropy_with_logits(d, torch.ones(6)) - 0.5 * (y * F.logsigmoid(d[:5])).mean()
        torch.testing.assert_close(loss, expect)
        assert model.link.client.spent == 5


def test_official_nets_have_the_published_layout() -> None:
    g, d = MEKDGenerator(10, 28, 1), MEKDDiscriminator(28, 1)
    x = g(torch.randn(4, 10))
    assert x.shape == (4, 1, 28, 28) and x.abs().max() <= 1
    assert d(x).shape == (4,)
    assert g.l1.out_features == 128 * 7 * 7 and g.conv_blocks[3].eps == 0.8
    assert [m.out_channels for m in d.model if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64, 128]
    model = MEKDDeprivatization(teacher="unused.ckpt", nets="official", **{**DIGITS, "image_size": 28})
    assert isinstance(model.generator, MEKDGenerator) and model.hparams.z_dim == 10


# ---------------------------------------------------------------------------- stage 2
def test_mekd_loss_matches_equation_14_by_hand(generator_ckpt: Path, digits8_teacher: Path) -> None:  # noqa: F811
    torch.manual_seed(0)
    s = torch.randn(5, 10)
    p = torch.softmax(torch.randn(5, 10) * 3, -1)
    ids = p.argmax(-1)
    for responses, answers in (("soft", p), ("hard", ids)):
        for norm, reduction, kl_scale in ((1, "sample_norm", "tau"), (2, "mean", "tau2"), (1, "mean", "none")):
            m = mekd(generator_ckpt, digits8_teacher, responses=responses, tau=5.0, beta=0.7, norm=norm)
            m.hparams.lf_reduction, m.hparams.kl_scale = reduction, kl_scale
            g = m.generator.g.eval()
            if responses == "soft":
                t = p.log() - p.log().mean(-1, keepdim=True)
                ss = s - s.mean(-1, keepdim=True)
            else:
                t, ss = F.one_hot(ids, 10).float(), s
            diff = (g(ss / 5) - g(t / 5)).flatten(1)
            if reduction == "mean":
                lf = diff.abs().mean() if norm == 1 else (diff**2).mean()
            else:
                lf = diff.abs().sum(1).mean()
            pt, ps = torch.softmax(t / 5, -1), torch.softmax(ss / 5, -1)
            kl = (pt * (pt.log() - ps.log())).sum(1).mean() * {"tau": 5.0, "tau2": 25.0, "none": 1.0}[kl_scale]
            parts = m.distill_loss(torch.zeros(5, 1, 8, 8), s, answers)
            torch.testing.assert_close(parts["lf"], lf, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(parts["kl"], 0.7 * kl, rtol=1e-4, atol=1e-6)


def test_answers_become_centred_log_probabilities_or_one_hot_logits() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1]])
    t = answer_logits(p, "soft", 3)
    torch.testing.assert_close(t.sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.softmax(t, -1), p)
    assert torch.equal(answer_logits(torch.tensor([2, 0]), "hard", 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))


def test_lf_gradients_reach_only_the_student_and_the_generator_stays_frozen(
    generator_ckpt: Path,
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    m = mekd(generator_ckpt, digits8_teacher, responses="soft", beta=0.0)
    m.train()
    assert not m.generator.training and not any(p.requires_grad for p in m.generator.parameters())
    x = torch.rand(6, 1, 8, 8)
    s = m(x)
    m.distill_loss(x, s, torch.softmax(torch.randn(6, 10), -1))["lf"].backward()
    assert all(p.grad is None for p in m.generator.parameters())
    assert sum(float(p.grad.abs().sum()) for p in m.net.parameters() if p.grad is not None) > 0
    before = {k: v.clone() for k, v in m.generator.state_dict().items()}
    seen: list[set] = []

    class Keys(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, i: int) -> None:
            seen.append(set(batch))
            assert not module.generator.training

    student_before = [p.clone() for p in m.net.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[Keys()], limit_val_batches=1)
    trainer.fit(m, pool("latent"))
    after = m.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert any(not torch.equal(a, b) for a, b in zip(student_before, m.net.parameters()))
    assert seen and all(keys == {"z", "index"} for keys in seen)  # no label ever reaches training
    assert (tmp_path / "queries" / "stats.json").is_file()


@pytest.mark.parametrize("arm", ["mekd_soft", "mekd_hard", "kd_gz"])
def test_the_pool_cache_trains_bit_identically_and_runs_the_generator_once_per_item(
    arm: str,
    generator_ckpt: Path,
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Three epochs over a 48-item latent pool with and without :class:`PoolCache`: the same weights, logged values
    and query stats; with the cache, G runs on the query side and the teacher side during the first epoch only."""
    results = {}
    for cached in (False, True):
        L.seed_everything(0)
        if arm == "kd_gz":
            m: MEKD | BlackBoxKD = BlackBoxKD(
                generator=str(generator_ckpt), teacher=str(digits8_teacher), net="tinynet", **DIGITS
            )
        else:
            m = mekd(generator_ckpt, digits8_teacher, responses=arm.split("_")[1], kl_scale="tau2")
        m.pool_cache = cached
        calls = []
        forward = m.generator.forward
        m.generator.forward = lambda z, f=forward, c=calls: c.append(len(z)) or f(z)  # type: ignore[method-assign]
        root = tmp_path / str(cached)
        trainer = quiet_trainer(root, max_steps=9, val_check_interval=3, limit_val_batches=2)
        trainer.fit(m, pool("latent"))
        stats = (root / "queries" / "stats.json").read_text()
        results[cached] = (m.state_dict(), dict(trainer.callback_metrics), stats, len(calls))
    (sd0, met0, stats0, calls0), (sd1, met1, stats1, calls1) = results[False], results[True]
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert met0.keys() == met1.keys() and all(torch.equal(met0[k], met1[k]) for k in met0)
    assert stats0 == stats1 and '"journal_spent": 48' in stats1  # every item paid once, later epochs free
    per_step = 1 if arm == "kd_gz" else 3  # G(z), and for MEKD G(T/tau) and G(S/tau)
    assert calls0 == 9 * per_step
    assert calls1 == 9 * per_step - 6 * (per_step - (arm != "kd_gz"))  # epochs 2-3: only MEKD's G(S/tau)


@pytest.mark.parametrize(("method", "responses"), [("kd", "soft"), ("kd", "hard"), ("ml", "soft"), ("dkd", "soft")])
def test_baselines_train_on_queried_local_images_without_labels(
    method: str,
    responses: str,
    digits8_teacher: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    seen: list[set] = []

    class Keys(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, i: int) -> None:
            seen.append(set(batch))

    m = BlackBoxKD(method=method, teacher=str(digits8_teacher), responses=responses, net="tinynet", **DIGITS)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[Keys()], limit_val_batches=1)
    trainer.fit(m, pool("local", size=64))
    assert seen and all(keys == {"image", "index"} for keys in seen)
    stats = (tmp_path / "queries" / "stats.json").read_text()
    assert '"journal_spent": 32' in stats  # 2 batches of 16 distinct local images


def test_baseline_losses_reuse_blkd_and_dkd_values(digits8_teacher: Path) -> None:  # noqa: F811
    torch.manual_seed(1)
    s, p = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)
    x = torch.zeros(4, 1, 8, 8)
    kd = BlackBoxKD(method="kd", teacher="x", T=4.0, **DIGITS).distill_loss(x, s, p)["kd"]
    pt = torch.softmax(p.log() / 4, -1)
    expect = (pt * (pt.log() - torch.log_softmax(s / 4, -1))).sum(1).mean() * 16
    torch.testing.assert_close(kd, expect)
    ml = BlackBoxKD(method="ml", teacher="x", **DIGITS).distill_loss(x, s, p)["ml"]
    torch.testing.assert_close(ml, F.mse_loss(s - s.mean(1, keepdim=True), p.log() - p.log().mean(1, keepdim=True)))
    ce = BlackBoxKD(method="kd", responses="hard", teacher="x", **DIGITS).distill_loss(x, s, p.argmax(-1))["ce"]
    torch.testing.assert_close(ce, F.cross_entropy(s, p.argmax(-1)))
    with pytest.raises(ConfigError, match="needs soft answers"):
        BlackBoxKD(method="ml", responses="hard", teacher="x", **DIGITS)


# ---------------------------------------------------------------------------- data
def test_edge_and_cloud_parts_are_disjoint_and_pools_deterministic() -> None:
    cloud, edge = DigitsEdgeCloud(part="cloud"), DigitsEdgeCloud(part="edge", augment=False)
    cloud.setup("fit"), edge.setup("fit")
    c = set(cloud.train_dataset.indices) | set(cloud.val_dataset.indices)
    e = set(edge.train_dataset.indices) | set(edge.val_dataset.indices)
    assert not c & e and len(edge.train_dataset) == 400 and len(edge.val_dataset) == 100
    a, b = pool("local", size=1200), pool("local", size=1200)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.train_dataset[1000]["image"], b.train_dataset[1000]["image"])  # view 2 of image 200
    assert torch.equal(a.train_dataset[5]["image"], edge.train_dataset[5]["image"])  # view 0 = the image
    with pytest.raises(ConfigError, match="augment"):
        QueryPoolDataModule(DigitsEdgeCloud(part="edge", augment=True), pool="local")
