"""AI-KD and the self-KD baselines: critic penalty, prediction store, class pairs, loss weights, mixing,
S_sup checks, exact resume, and a fast_dev_run of every self-KD recipe (fake CUB files, fake Fashion-MNIST
files, digits)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.data.mixing import BatchMixer
from kd_lightning.data.pairs import ClassPairSampler, PairedDataset
from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.gans.critic import LogitCritic, adversarial_loss, wgan_gp_critic_parts
from kd_lightning.methods import AIKD, CSKD, PSKD, SelfKD
from kd_lightning.methods.self_kd import STORE_KEY
from tests.fake_datasets import write_cub
from tests.helpers import QUIET_TRAINER, QUIET_TRAINER_KW, RECIPES, write_teacher

STORE_STATE = "terms.progressive._extra_state"  # the progressive store in a SelfKD checkpoint's state dict


# ------------------------------------------------------------------------------------------ critic
def test_critic_layout() -> None:
    critic = LogitCritic(7)
    kinds = [type(m).__name__ for m in critic.layers]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]
    assert [m.out_features for m in critic.layers if isinstance(m, torch.nn.Linear)] == [64, 32, 1]
    assert critic(torch.randn(5, 7)).shape == (5,)


def separate_gp(
    critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor | None = None
) -> torch.Tensor:
    """The penalty of :func:`wgan_gp_critic_parts` with real, fake and x_hat as three batches."""
    return wgan_gp_critic_parts(critic, real, fake, joint=False, eps=eps)["gp"]


def test_critic_names_still_import_from_methods() -> None:
    """Recipes and user code written before the critic moved to ``gans/`` keep their import paths."""
    from kd_lightning.methods import self_kd

    assert self_kd.LogitCritic is LogitCritic
    assert self_kd.wgan_gp_critic_parts is wgan_gp_critic_parts
    assert self_kd.adversarial_loss is adversarial_loss


def test_self_kd_classes_resolve_by_every_path_recipes_may_name(tmp_path: Path) -> None:
    """The baselines moved to ``methods/self_kd_baselines.py``; ``methods.self_kd.<name>`` still resolves."""
    from jsonargparse import ArgumentParser

    from kd_lightning import methods
    from kd_lightning.methods import self_kd, self_kd_baselines

    for name in ("AIKD", "SelfKD", "PSKD", "CSKD", "TFKD"):
        assert getattr(self_kd, name) is getattr(methods, name)
    assert self_kd.PSKD is self_kd_baselines.PSKD
    with pytest.raises(AttributeError, match="no attribute 'NOPE'"):
        self_kd.NOPE  # noqa: B018
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    for path in ("kd_lightning.methods.self_kd.TFKD", "kd_lightning.methods.TFKD", "TFKD"):
        args = [f"--model={path}", "--model.init_args.variant=regularization", "--model.init_args.num_classes=10"]
        model = parser.instantiate(parser.parse_args(args)).model
        assert type(model) is methods.TFKD and model.hparams.guide_target == "designed"


def test_gradient_penalty_equals_an_independent_computation() -> None:
    torch.manual_seed(3)
    critic = LogitCritic(4, hidden=(6, 5))
    real, fake = torch.randn(8, 4) * 3, torch.randn(8, 4)
    eps = torch.linspace(0.05, 0.95, 8)
    gp = separate_gp(critic, real, fake, eps)

    # plainly: central finite differences of sum_n D(x_hat)_n (BN in training mode couples the rows) in float64
    d64 = LogitCritic(4, hidden=(6, 5)).double()
    d64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in critic.state_dict().items()})
    x_hat = eps[:, None].double() * real.double() + (1 - eps[:, None].double()) * fake.double()
    h = 1e-6
    grad = torch.zeros_like(x_hat)
    with torch.no_grad():
        for i in range(x_hat.shape[0]):
            for j in range(x_hat.shape[1]):
                up, down = x_hat.clone(), x_hat.clone()
                up[i, j] += h
                down[i, j] -= h
                grad[i, j] = (d64(up).sum() - d64(down).sum()) / (2 * h)
    norms = [float(sum(float(g) ** 2 for g in row) ** 0.5) for row in grad]
    expected = sum((n - 1.0) ** 2 for n in norms) / len(norms)
    assert float(gp.detach()) == pytest.approx(expected, rel=1e-4)

    # the same value under bf16 autocast: the penalty is computed in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp_amp = separate_gp(critic, real.bfloat16(), fake.bfloat16(), eps)
    assert gp_amp.dtype == torch.float32
    assert float(gp_amp.detach()) == pytest.approx(
        float(separate_gp(critic, real.bfloat16().float(), fake.bfloat16().float(), eps)), rel=1e-6
    )


def test_critic_loss_is_wgan_gp(tmp_path: Path) -> None:
    ssup = write_teacher(tmp_path / "s.ckpt", 3, 1, net="tinynet")
    torch.manual_seed(0)
    real, fake = torch.randn(6, 3), torch.randn(6, 3)
    # critic_norm "separate": real, fake and the penalty's mix are three batches (the behaviour before the fix)
    model = AIKD(pretrained=str(ssup), net="tinynet", num_classes=3, in_channels=1, critic_norm="separate")
    torch.manual_seed(1)
    parts = model.critic_parts(real, fake)
    torch.manual_seed(1)
    d_real, d_fake = model.critic(real).mean(), model.critic(fake).mean()
    gp = separate_gp(model.critic, real, fake)
    assert float(parts["critic"]) == pytest.approx(float(d_fake - d_real + 10.0 * gp), rel=1e-5)
    assert float(parts["gp"]) == pytest.approx(float(gp), rel=1e-5)

    # default "joint": one batch [real; fake; x_hat] through the critic, the penalty's gradient from that pass
    model = AIKD(pretrained=str(ssup), net="tinynet", num_classes=3, in_channels=1)
    assert model.hparams.critic_norm == "joint"
    eps = torch.linspace(0.1, 0.9, 6)[:, None]
    torch.manual_seed(1)
    parts = model.critic_parts(real, fake)
    torch.manual_seed(1)
    drawn = torch.rand(6, 1)
    x_hat = (drawn * real + (1 - drawn) * fake).requires_grad_(True)
    scores = model.critic(torch.cat([real, fake, x_hat]))
    (grad,) = torch.autograd.grad(scores[12:].sum(), x_hat)
    gp = ((grad.norm(dim=1) - 1) ** 2).mean()
    wasserstein = scores[:6].mean() - scores[6:12].mean()
    assert float(parts["wasserstein"]) == pytest.approx(float(wasserstein), rel=1e-5)
    assert float(parts["gp"]) == pytest.approx(float(gp), rel=1e-5)
    assert float(parts["critic"]) == pytest.approx(float(-wasserstein + 10 * gp), rel=1e-5)
    assert not torch.allclose(parts["gp"], wgan_gp_critic_parts(model.critic, real, fake, joint=False, eps=eps)["gp"])
    assert [
        type(m).__name__
        for m in AIKD(
            pretrained=str(ssup), net="tinynet", num_classes=3, in_channels=1, critic_norm="none"
        ).critic.layers
    ][1] == "Identity"
    with pytest.raises(ConfigError, match="critic_norm='batch'"):
        AIKD(pretrained=str(ssup), net="tinynet", num_classes=3, in_channels=1, critic_norm="batch")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["shift", "scale"])
@pytest.mark.parametrize("norm", ["joint", "none", "separate"])
def test_critic_sees_a_logit_shift_or_scale(kind: str, norm: str) -> None:
    """S_sup's logits vs student logits that differ only by an offset (x + 1.5) or a confidence (2x + 0.5).
    With BN on each set alone (``separate``) the critic is blind: D(x) = D(x + c) = D(2x + c) row by row,
    so the student gets no gradient toward S_sup; ``joint`` (default) and ``none`` separate them."""
    torch.manual_seed(0)
    real = torch.randn(64, 10)
    fake = real + 1.5 if kind == "shift" else 2 * real + 0.5
    critic = LogitCritic(10, batch_norm=norm != "none")
    joint = norm == "joint"
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    for _ in range(150):
        parts = wgan_gp_critic_parts(critic, real, fake, joint=joint)
        opt.zero_grad()
        parts["critic"].backward()
        opt.step()
    wasserstein = float(wgan_gp_critic_parts(critic, real, fake, joint=joint)["wasserstein"])
    # the student's gradient from L_A: a descent step on fake must move it toward real
    student = fake.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(adversarial_loss(critic, student, real, joint=joint), student)
    toward_real = float((-grad * (real - fake)).sum())
    if norm == "separate":
        assert abs(wasserstein) < 1e-4
        assert abs(toward_real) < 1e-4
    else:
        assert wasserstein > 0.5
        assert toward_real > 1e-3


# ------------------------------------------------------------------------------------------ store
def test_progressive_store_returns_last_predictions_by_index() -> None:
    from kd_lightning.losses import ProgressiveKL

    term = ProgressiveKL(3, T=2.0)
    term.after_step(torch.tensor([5, 2]), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    term.after_step(torch.tensor([5]), torch.tensor([[7.0, 8.0, 9.0]]))  # a later prediction replaces the old one
    logits, seen = term.lookup(torch.tensor([2, 5, 7]))
    assert logits.tolist() == [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [0.0, 0.0, 0.0]]
    assert seen.tolist() == [True, True, False]
    target = term.targets(torch.tensor([2, 7]), torch.tensor([0, 1]))
    assert torch.allclose(target[0], F.softmax(torch.tensor([4.0, 5.0, 6.0]) / 2, -1))
    assert target[1].tolist() == [0.0, 1.0, 0.0]  # no prediction yet: the one-hot label
    restored = ProgressiveKL(3)
    restored.load_state_dict(term.state_dict())  # the store travels in the module's state dict (extra state)
    assert torch.equal(restored.lookup(torch.tensor([2, 5]))[0], logits[:2])
    assert restored.lookup(torch.tensor([7]))[1].tolist() == [False]
    with pytest.raises(CheckpointError, match="num_classes=4"):
        ProgressiveKL(4).load_state_dict(term.state_dict())


def test_a_checkpoint_with_the_old_store_key_still_loads(tmp_path: Path) -> None:
    model = PSKD(net="tinynet", num_classes=3, in_channels=1)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    old = {"logits": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), "seen": torch.tensor([True, False])}
    checkpoint = {"state_dict": state, STORE_KEY: old}
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    logits, seen = model.progressive.lookup(torch.tensor([0, 1]))
    assert torch.equal(logits, old["logits"]) and seen.tolist() == [True, False]


class RecordLogits(L.Callback):
    """Record, per sample index, the logits the training step computed (epoch 0), and what the store
    returns for each batch at the start of epoch 1."""

    def __init__(self) -> None:
        self.epoch0: dict[int, torch.Tensor] = {}
        self.looked_up: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        self._handle: Any = None

    def on_train_start(self, trainer, pl_module):
        self._handle = pl_module.net.register_forward_hook(self._keep)
        self._last: torch.Tensor | None = None

    def _keep(self, module, inputs, output):
        if module.training and torch.is_grad_enabled():
            self._last = output.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            logits, seen = pl_module.progressive.lookup(batch["index"])
            self.looked_up.append((batch["index"].tolist(), logits.clone(), seen.clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0:
            for i, row in zip(batch["index"].tolist(), self._last):
                self.epoch0[i] = row


def test_store_holds_last_epochs_predictions_during_training(tmp_path: Path) -> None:
    from kd_lightning.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=32, train_size=96, num_workers=0)
    model = PSKD(net="tinynet", num_classes=10, in_channels=1, image_size=8)
    rec = RecordLogits()
    trainer = L.Trainer(
        max_epochs=2,
        enable_checkpointing=False,
        **QUIET_TRAINER_KW,
        callbacks=[rec],
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    assert len(rec.epoch0) >= 90 and rec.looked_up  # (a stratified 96 may round up; drop_last skips the rest)
    checked = 0
    for indices, logits, seen in rec.looked_up:
        for i, row, was_seen in zip(indices, logits, seen.tolist()):
            assert was_seen == (i in rec.epoch0)  # trained on in epoch 0 <=> stored
            if was_seen:
                assert torch.allclose(row, rec.epoch0[i], atol=1e-6)
                checked += 1
    assert checked >= 80


# ------------------------------------------------------------------------------------------ pairs
def test_class_pair_sampler_yields_same_class_pairs_and_resumes() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 1, 0, 3])  # class 3 has one sample: paired with itself
    data = list(range(len(labels)))
    s = ClassPairSampler(data, labels, seed=4)
    s.set_epoch(1)
    pairs = list(s)
    assert sorted(i for i, _ in pairs) == data
    for i, j in pairs:
        assert labels[i] == labels[j]
        assert j != i or i == 10
    again = ClassPairSampler(data, labels, seed=4)
    again.set_epoch(1)
    assert list(again) == pairs  # a function of (seed, epoch)
    other = ClassPairSampler(data, labels, seed=4)
    other.set_epoch(2)
    assert list(other) != pairs
    resumed = ClassPairSampler(data, labels, seed=4)
    resumed.load_state_dict(s.state_dict(consumed=4))
    assert list(resumed) == pairs[4:]
    # the paired dataset serves both samples
    base = [{"image": torch.full((1, 2, 2), float(i)), "label": labels[i], "index": i} for i in data]
    item = PairedDataset(base)[(0, 3)]  # type: ignore[arg-type]
    assert item["index"] == 0 and item["pair_index"] == 3 and float(item["pair_image"].mean()) == 3.0


def test_cskd_without_class_pairs_is_a_clear_error(fake_mnist: Path, kdl, capsys) -> None:
    rc = kdl(
        "fit",
        "--config",
        str(RECIPES / "fashion_mnist/cskd.yaml"),
        "--data.init_args.root",
        str(fake_mnist),
        "--data.init_args.class_pairs",
        "false",
        "--trainer.fast_dev_run",
        "1",
        *QUIET_TRAINER,
    )
    assert rc == 2 and "class_pairs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ loss
def plain_kl(p: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
    q = F.softmax(logits / t, -1)
    return (p * (p.clamp_min(1e-30).log() - q.log())).sum(-1).mean()


def test_loss_parts_combine_with_the_documented_weights(tmp_path: Path) -> None:
    ssup = write_teacher(tmp_path / "s.ckpt", 4, 1, net="tinynet")
    model = AIKD(
        pretrained=str(ssup),
        net="tinynet",
        num_classes=4,
        in_channels=1,
        guide_weight=0.2,
        progressive_weight=0.3,
        guide_temperature=3.0,
        progressive_temperature=2.0,
        adversarial_weight=0.5,
    )
    torch.manual_seed(0)
    logits, guide, prev = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    label = torch.tensor([0, 1, 2, 3, 0, 1])
    prev_p = F.softmax(prev / 2.0, -1)
    from kd_lightning.data.mixing import MixedBatch

    model.progressive.after_step(torch.arange(6), prev)  # last logits: targets softmax(prev / 2)
    parts = model.student_parts(logits, MixedBatch(logits, label), torch.arange(6), guide)
    ce = F.cross_entropy(logits, label)
    prog = 4.0 * plain_kl(prev_p, logits, 2.0)
    guide_kl = 9.0 * plain_kl(F.softmax(guide / 3.0, -1), logits, 3.0)
    adv = -model.critic(torch.cat([guide, logits]))[6:].mean()  # joint batch with S_sup's logits
    for name, value in (("ce", ce), ("progressive", prog), ("guide", guide_kl), ("adv", adv)):
        assert float(parts[name]) == pytest.approx(float(value), rel=1e-5), name
    total = (1 - 0.3 - 0.2) * ce + 0.3 * prog + 0.2 * guide_kl + 0.5 * adv
    assert float(model.combine(parts)) == pytest.approx(float(total), rel=1e-5)


def test_tfkd_variants_and_the_official_kl_scale(tmp_path: Path) -> None:
    from kd_lightning.data.mixing import MixedBatch
    from kd_lightning.methods import TFKD

    torch.manual_seed(0)
    logits, guide = torch.randn(5, 4), torch.randn(5, 4)
    label = torch.tensor([0, 3, 1, 2, 3])
    batch = MixedBatch(logits, label)
    ssup = write_teacher(tmp_path / "s.ckpt", 4, 1, net="tinynet")
    tf_self = TFKD(pretrained=str(ssup), net="tinynet", num_classes=4, in_channels=1)
    assert (tf_self.hparams.guide_weight, tf_self.hparams.guide_temperature) == (0.95, 6.0)
    expected = 36.0 * plain_kl(F.softmax(guide / 6.0, -1), logits, 6.0)
    assert float(tf_self.student_parts(logits, batch, guide_logits=guide)["guide"]) == pytest.approx(
        float(expected), rel=1e-4
    )
    # the official scale: nn.KLDivLoss() (mean over batch AND classes) x T^2 x multiplier 50
    official = TFKD(
        pretrained=str(ssup), net="tinynet", num_classes=4, in_channels=1, guide_reduction="mean", guide_multiplier=50
    )
    p = F.softmax(guide / 6.0, -1)
    kl_mean = (p * (p.log() - F.log_softmax(logits / 6.0, -1))).mean()
    got = official.student_parts(logits, batch, guide_logits=guide)["guide"]
    assert float(got) == pytest.approx(float(kl_mean * 36.0 * 50), rel=1e-5)

    # regularisation: the designed teacher p^d (0.99 on the true class), softened by softmax(p^d / T); no S_sup
    reg = TFKD(variant="regularization", net="tinynet", num_classes=4, in_channels=1)
    assert (reg.hparams.guide_weight, reg.hparams.guide_temperature, reg.guide) == (0.1, 20.0, None)
    p_d = torch.full((5, 4), 0.01 / 3)
    p_d[torch.arange(5), label] = 0.99
    target = F.softmax(p_d / 20.0, -1)
    paper = (target * (target.log() - F.log_softmax(logits / 20.0, -1))).sum(1).mean()  # p_tau of the student, no T^2
    assert float(reg.student_parts(logits, batch)["guide"]) == pytest.approx(float(paper), rel=1e-4)
    code = TFKD(
        variant="regularization",
        net="tinynet",
        num_classes=4,
        in_channels=1,
        designed_tempered_student=False,
        guide_reduction="mean",
        guide_multiplier=100,
    )
    as_coded = (target * (target.log() - F.log_softmax(logits, -1))).mean() * 100
    assert float(code.student_parts(logits, batch)["guide"]) == pytest.approx(float(as_coded), rel=1e-5)
    assert float(code.combine(code.student_parts(logits, batch))) == pytest.approx(
        float(0.9 * F.cross_entropy(logits, label) + 0.1 * as_coded), rel=1e-5
    )
    with pytest.raises(ConfigError, match="variant='teacher'"):
        TFKD(variant="teacher", net="tinynet", num_classes=4, in_channels=1)  # type: ignore[arg-type]


def test_pskd_ramp_and_weight_validation() -> None:
    model = PSKD(net="tinynet", num_classes=3, in_channels=1)
    trainer = L.Trainer(max_epochs=10, logger=False)
    model.trainer = trainer
    trainer.fit_loop.epoch_progress.current.completed = 4  # epoch 4 of 10 -> a_t = 0.8 * 5 / 10
    assert model.progressive_weight_now() == pytest.approx(0.4)
    assert model.loss_weights()["ce"] == pytest.approx(0.6)
    with pytest.raises(ConfigError, match="negative"):
        SelfKD(net="tinynet", num_classes=3, in_channels=1, guide_weight=0.6, progressive_weight=0.5, pretrained="x")
    with pytest.raises(ConfigError, match="pretrained"):
        AIKD(net="tinynet", num_classes=3, in_channels=1)
    with pytest.raises(ConfigError, match="temperature"):
        CSKD(net="tinynet", num_classes=3, in_channels=1, class_wise_temperature=0)


# ------------------------------------------------------------------------------------------ mixing
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_mixes_images_labels_and_targets_alike(mode: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    pair = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = BatchMixer(mode, alpha=1.0)(x, y, pair)
    assert out.mixed and 0.0 <= out.lam <= 1.0
    if mode == "mixup":
        assert torch.allclose(out.image, out.lam * x + (1 - out.lam) * x[out.perm])
        assert torch.allclose(out.pair_image, out.lam * pair + (1 - out.lam) * pair[out.perm])
    else:  # the pasted area is 1 - lam of the image, in both batches
        pasted = (out.image != x).float().mean() if out.lam < 1 else torch.tensor(0.0)
        assert float(pasted) <= 1 - out.lam + 1e-6
    logits = torch.randn(6, 3)
    ce = out.cross_entropy(logits)
    expected = out.lam * F.cross_entropy(logits, y) + (1 - out.lam) * F.cross_entropy(logits, y[out.perm])
    assert float(ce) == pytest.approx(float(expected), rel=1e-6)
    q = F.softmax(torch.randn(6, 3), -1)
    assert torch.allclose(out.mix_targets(q), out.lam * q + (1 - out.lam) * q[out.perm])


def test_cutout_blanks_one_square_per_image() -> None:
    torch.manual_seed(0)
    x = torch.ones(5, 1, 16, 16)
    out = BatchMixer("cutout", cutout_size=4, fill=0.0)(x, torch.zeros(5, dtype=torch.long))
    assert not out.mixed and torch.equal(out.label, torch.zeros(5, dtype=torch.long))
    blanked = (out.image == 0).flatten(1).sum(1)
    assert (blanked > 0).all() and (blanked <= 16).all()


# ------------------------------------------------------------------------------------------ S_sup
def test_ssup_of_another_architecture_or_class_count_is_refused(tmp_path: Path) -> None:
    other_net = write_teacher(tmp_path / "a.ckpt", 4, 1, net="resnet8")
    with pytest.raises(ConfigError, match=r"'resnet8'.*net='tinynet'"):
        AIKD(pretrained=str(other_net), net="tinynet", num_classes=4, in_channels=1)
    other_classes = write_teacher(tmp_path / "b.ckpt", 5, 1, net="tinynet")
    with pytest.raises(ConfigError, match=r"num_classes=5.*num_classes=4"):
        AIKD(pretrained=str(other_classes), net="tinynet", num_classes=4, in_channels=1)


def test_missing_ssup_is_one_clear_message(tmp_path: Path, kdl, capsys) -> None:
    root = write_cub(tmp_path / "cub", num_classes=3, per_class=3, size=16)
    rc = kdl(
        "fit",
        "--config",
        str(RECIPES / "aikd_cub.yaml"),
        "--data.init_args.root",
        str(root),
        "--trainer.fast_dev_run",
        "1",
        *QUIET_TRAINER,
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "runs/cub200/teacher/checkpoints/best.ckpt" in err and "does not exist" in err
    assert "recipes/cub200/teacher.yaml" in err


@pytest.mark.parametrize("mixing", ["cutmix", "mixup", "cutout"])
def test_aikd_on_digits_with_augmentation(mixing: str, kdl, tmp_path: Path) -> None:
    ssup = write_teacher(tmp_path / "ssup.ckpt", 10, 1, mean=(0.3053,), std=(0.3760,), net="resnet8")
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / "fashion_mnist/aikd.yaml"),
            "--data",
            "DigitsDataModule",
            "--data.init_args.batch_size",
            "32",
            "--model.init_args.pretrained",
            str(ssup),
            "--model.init_args.mixing",
            mixing,
            "--trainer.fast_dev_run",
            "2",
            *QUIET_TRAINER,
        )
        == 0
    )


def test_cskd_with_cutmix_on_digits(kdl) -> None:
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / "fashion_mnist/cskd.yaml"),
            "--data",
            "DigitsDataModule",
            "--data.init_args.class_pairs",
            "true",
            "--data.init_args.batch_size",
            "32",
            "--model.init_args.mixing",
            "cutmix",
            "--trainer.fast_dev_run",
            "1",
            *QUIET_TRAINER,
        )
        == 0
    )


# ------------------------------------------------------------------------------------------ resume
RESUME_ARGS = [
    "--data",
    "DigitsDataModule",
    "--data.init_args.train_size",
    "128",
    "--data.init_args.batch_size",
    "32",
    "--model.init_args.net",
    "tinynet",
    "--trainer.max_epochs",
    "3",
    "--model.init_args.lr_scheduler.init_args.T_max",
    "3",
    *QUIET_TRAINER,
]


class CrashAtEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("injected crash")


def test_aikd_resume_restores_the_store_exactly(kdl, kdl_callbacks, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    ssup = write_teacher(tmp_path / "ssup.ckpt", 10, 1, mean=(0.3053,), std=(0.3760,), net="tinynet")
    args = [
        "fit",
        "--config",
        str(RECIPES / "fashion_mnist/aikd.yaml"),
        *RESUME_ARGS,
        "--model.init_args.pretrained",
        str(ssup),
    ]
    assert kdl(*args, "--trainer.default_root_dir", "ref") == 0
    extra = kdl_callbacks
    extra[:] = [CrashAtEpoch(2)]
    with pytest.raises(RuntimeError, match="injected crash"):
        kdl(*args, "--trainer.default_root_dir", "run")
    interrupted = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    stored = interrupted["state_dict"][STORE_STATE]
    assert interrupted["epoch"] == 1 and int(stored["seen"].sum()) == 128 and STORE_KEY not in interrupted

    restored: dict[str, torch.Tensor] = {}

    class CheckStore(L.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update(pl_module.progressive.store.state_dict()["fields"])

    extra[:] = [CheckStore()]
    assert kdl(*args, "--trainer.default_root_dir", "run", "--ckpt_path", "last") == 0
    assert torch.equal(restored["logits"], stored["fields"]["logits"])
    ref, res = (
        load_checkpoint(tmp_path / "ref/checkpoints/last.ckpt"),
        load_checkpoint(tmp_path / "run/checkpoints/last.ckpt"),
    )
    for key, value in ref["state_dict"].items():
        if key == STORE_STATE:
            assert torch.equal(value["fields"]["logits"], res["state_dict"][key]["fields"]["logits"])
            assert torch.equal(value["seen"], res["state_dict"][key]["seen"])
        else:
            assert torch.equal(value, res["state_dict"][key]), key
    assert [s["state"] for s in ref["optimizer_states"]].__len__() == 2  # student and critic optimisers


@pytest.mark.slow
def test_store_is_complete_under_ddp(tmp_path: Path) -> None:
    """Two gloo ranks each train on half of every epoch; both halves must reach the (rank-0) checkpoint's store."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    ssup = write_teacher(tmp_path / "ssup.ckpt", 10, 1, mean=(0.3053,), std=(0.3760,), net="tinynet")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    args = [
        "fit",
        "--config",
        str(RECIPES / "fashion_mnist/aikd.yaml"),
        *RESUME_ARGS,
        "--trainer.max_epochs",
        "1",
        "--model.init_args.pretrained",
        str(ssup),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "kd_lightning.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["state_dict"][STORE_STATE]
    # 128 images, 64 per rank, 2 steps of 32 per rank: all 128 stored (one rank alone would hold 64)
    assert int(store["seen"].sum()) == 128


# ------------------------------------------------------------------------------------------ terms
def test_self_kd_terms_are_their_own_registry_and_distill_refuses_them(tmp_path: Path) -> None:
    from kd_lightning.losses import ClassWiseKL, GuideKL, list_losses, list_self_kd_terms
    from kd_lightning.methods import DistillModule

    assert list_self_kd_terms() == ["ClassWiseKL", "GuideKL", "ProgressiveKL"]
    assert not set(list_self_kd_terms()) & set(list_losses())
    teacher = write_teacher(tmp_path / "t.ckpt", 4, 1, net="tinynet")
    with pytest.raises(ConfigError, match="GuideKL is a self-distillation term"):
        DistillModule(net="tinynet", num_classes=4, in_channels=1, teacher=str(teacher), kd_losses=[GuideKL()])
    with pytest.raises(ConfigError, match="not a SelfKDTerm"):
        SelfKD(net="tinynet", num_classes=4, in_channels=1, terms=[torch.nn.Identity()])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="second term named 'class_wise'"):
        CSKD(net="tinynet", num_classes=4, in_channels=1, terms=[ClassWiseKL()])


def test_an_extra_term_equals_the_built_in_one_and_takes_its_weight_from_ce() -> None:
    """``terms=[ProgressiveKL(...)]`` on a plain SelfKD is the same loss as ``progressive_weight``/``_temperature``."""
    from kd_lightning.data.mixing import MixedBatch
    from kd_lightning.losses import ProgressiveKL

    built_in = SelfKD(net="tinynet", num_classes=4, in_channels=1, progressive_weight=0.3, progressive_temperature=2.0)
    extra = SelfKD(net="tinynet", num_classes=4, in_channels=1, terms=[ProgressiveKL(4, T=2.0, weight=0.3)])
    torch.manual_seed(0)
    logits, prev = torch.randn(6, 4), torch.randn(6, 4)
    label, index = torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(10, 16)
    for model in (built_in, extra):
        model.progressive.after_step(index[:4], prev[:4])  # two samples not seen yet: their one-hot label is the target
    a = built_in.student_parts(logits, MixedBatch(logits, label), index)
    b = extra.student_parts(logits, MixedBatch(logits, label), index)
    assert a.keys() == b.keys() == {"ce", "progressive"}
    assert extra.loss_weights()["ce"] == pytest.approx(0.7)
    target = torch.cat([F.softmax(prev[:4] / 2.0, -1), F.one_hot(label[4:], 4).float()])
    expected = 0.7 * F.cross_entropy(logits, label) + 0.3 * 4.0 * plain_kl(target, logits, 2.0)
    assert float(built_in.combine(a)) == float(extra.combine(b))
    assert float(extra.combine(b)) == pytest.approx(float(expected), rel=1e-5)


def test_a_new_term_is_one_class(tmp_path: Path) -> None:
    """A term defined outside the package trains through SelfKD, is logged, and adds to the CE weight."""
    from kd_lightning.data import DigitsDataModule
    from kd_lightning.losses import SelfKDTerm

    class Confidence(SelfKDTerm):  # a toy term: the mean max-probability (a confidence penalty)
        @property
        def name(self) -> str:
            return "confidence"

        def forward(self, student, teacher, batch, ctx=None):
            return F.softmax(student.logits, -1).max(-1).values.mean()

    model = SelfKD(net="tinynet", num_classes=10, in_channels=1, terms=[Confidence(weight=0.5)])
    assert model.loss_weights() == {"ce": 1.0, "confidence": 0.5, "adv": 0.0}
    logged: dict[str, float] = {}

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(max_steps=2, callbacks=[Keep()], default_root_dir=tmp_path, **QUIET_TRAINER_KW)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert 0.1 <= logged["train/confidence_step"] <= 1.0
    total = logged["train/ce_step"] + 0.5 * logged["train/confidence_step"]
    assert logged["train/loss_step"] == pytest.approx(total, rel=1e-5)


def test_guidekl_golden_values_for_both_targets() -> None:
    from kd_lightning.losses import GuideKL
    from kd_lightning.losses.base import Outputs

    torch.manual_seed(1)
    s, g, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 3])
    batch = {"mixed": BatchMixer("none")(s, y), "label": y}
    value = GuideKL(T=3.0)(Outputs(s), Outputs(g), batch)
    assert float(value) == pytest.approx(float(9.0 * plain_kl(F.softmax(g / 3.0, -1), s, 3.0)), rel=1e-5)
    halved = GuideKL(T=3.0, reduction="mean", multiplier=2.0)(Outputs(s), Outputs(g), batch)
    assert float(halved) == pytest.approx(float(value) / 4 * 2, rel=1e-6)  # / C classes, x multiplier
    p_d = torch.full((5, 4), 0.2 / 3)
    p_d[torch.arange(5), y] = 0.8
    target = F.softmax(p_d / 2.0, -1)
    designed = GuideKL(T=2.0, target="designed", correct_prob=0.8)(Outputs(s), None, batch)
    assert float(designed) == pytest.approx(float(plain_kl(target, s, 2.0)), rel=1e-5)  # no T^2
    with pytest.raises(ConfigError, match="S_sup"):
        GuideKL()(Outputs(s), None, batch)


def test_progressivekl_golden_value_and_store_update() -> None:
    from kd_lightning.losses import ProgressiveKL
    from kd_lightning.losses.base import Outputs

    torch.manual_seed(2)
    s, prev, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([2, 0, 1, 1])
    term = ProgressiveKL(3, T=2.0, weight=0.5)
    batch = {"mixed": BatchMixer("none")(s, y), "label": y, "index": torch.tensor([7, 8, 9, 10])}
    first = term(Outputs(s), None, batch)  # nothing stored: one-hot targets
    assert float(first) == pytest.approx(float(4.0 * plain_kl(F.one_hot(y, 3).float(), s, 2.0)), rel=1e-5)
    term.after_step(batch["index"], prev)
    second = term(Outputs(s), None, batch)
    assert float(second) == pytest.approx(float(4.0 * plain_kl(F.softmax(prev / 2.0, -1), s, 2.0)), rel=1e-5)
    ramped = ProgressiveKL(3, weight=0.8, ramp=True)
    assert [ramped.weight_at(e, 4) for e in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_classwisekl_golden_value() -> None:
    from kd_lightning.losses import ClassWiseKL
    from kd_lightning.losses.base import Outputs

    torch.manual_seed(3)
    s, pair, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    value = ClassWiseKL(T=4.0)(Outputs(s), None, {"pair_logits": pair, "label": y})
    assert float(value) == pytest.approx(float(16.0 * plain_kl(F.softmax(pair / 4.0, -1), s, 4.0)), rel=1e-5)
    with pytest.raises(ConfigError, match="class_pairs"):
        ClassWiseKL()(Outputs(s), None, {"label": y})


# ------------------------------------------------------------------------------------------ critic schedule
def _tiny_aikd(ssup: Path, **kw: Any) -> AIKD:
    return AIKD(pretrained=str(ssup), net="tinynet", num_classes=10, in_channels=1, image_size=8, **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"critic_steps": 0}, "critic_steps=0; expected an integer >= 1"),
        ({"critic_steps": 2.5}, "critic_steps=2.5; expected an integer >= 1"),
        ({"critic_lr": 0.0}, "critic_lr=0.0; expected a learning rate > 0"),
        ({"critic_lr": -1e-3}, "critic_lr=-0.001; expected a learning rate > 0"),
        ({"critic_betas": (1.0, 0.9)}, r"critic_betas=\[1.0, 0.9\]; expected two Adam betas in \[0, 1\)"),
        ({"critic_warmup_steps": -1}, "critic_warmup_steps=-1; expected an integer >= 0"),
        ({"critic_warmup_epochs": 1, "critic_warmup_steps": 5}, "set one of them"),
        ({"critic_lost_epochs": -2}, "critic_lost_epochs=-2; expected an integer >= 0"),
        (
            {"critic_optimizer": functools.partial(torch.optim.SGD, lr=0.1), "critic_lr": 1e-4},
            "critic_optimizer is given and so are critic_lr=0.0001 / critic_betas",
        ),
    ],
)
def test_critic_schedule_arguments_are_checked(kwargs: dict, message: str, tmp_path: Path) -> None:
    ssup = write_teacher(tmp_path / "s.ckpt", 10, 1, net="tinynet", image_size=8)
    with pytest.raises(ConfigError, match=message):
        _tiny_aikd(ssup, **kwargs)


def test_a_bad_critic_setting_is_one_line_from_kdl(kdl, capsys) -> None:
    rc = kdl(
        "fit",
        "--config",
        str(RECIPES / "fashion_mnist/aikd.yaml"),
        "--data",
        "DigitsDataModule",
        "--model.init_args.critic_steps",
        "0",
        "--trainer.fast_dev_run",
        "1",
        *QUIET_TRAINER,
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "critic_steps=0" in err


def test_critic_lr_and_betas_build_the_critics_adam(tmp_path: Path) -> None:
    ssup = write_teacher(tmp_path / "s.ckpt", 10, 1, net="tinynet", image_size=8)
    model = _tiny_aikd(ssup, critic_lr=3e-4, critic_betas=(0.5, 0.9))
    _, critic_opt = model.configure_optimizers()  # no scheduler in this model
    assert isinstance(critic_opt, torch.optim.Adam)
    assert critic_opt.defaults["lr"] == 3e-4 and critic_opt.defaults["betas"] == (0.5, 0.9)
    assert {id(p) for g in critic_opt.param_groups for p in g["params"]} == {id(p) for p in model.critic.parameters()}
    given = _tiny_aikd(ssup, critic_optimizer=functools.partial(torch.optim.RMSprop, lr=5e-5))
    assert isinstance(given.configure_optimizers()[1], torch.optim.RMSprop)  # an injected optimiser still wins


def test_adversarial_guide_cosine_is_the_cosine_of_the_logit_gradients() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    adv, guide = (logits * a).sum(), (logits * b).sum() ** 2  # d guide / d logits = 2 guide b: same direction as b
    got = SelfKD.adversarial_guide_cosine(logits, adv, guide)
    expected = F.cosine_similarity(a.flatten(), (b * float(guide.detach().sign())).flatten(), dim=0)
    assert float(got) == pytest.approx(float(expected), abs=1e-6)


class CriticLog(L.Callback):
    """Per epoch: the logged W (first critic update of each step) and cosine; per batch: the adversarial weight
    and the critic's Adam step count."""

    def __init__(self) -> None:
        self.w: list[float] = []
        self.cos: list[float] = []
        self.adv_weight: list[float] = []
        self.critic_steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.adv_weight.append(pl_module.loss_weights()["adv"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[1].state
        self.critic_steps.append(int(next(iter(state.values()))["step"]) if state else 0)

    def on_train_epoch_end(self, trainer, pl_module):
        self.w.append(float(trainer.callback_metrics["train/wasserstein_epoch"]))
        self.cos.append(float(trainer.callback_metrics["train/adv_guide_cos"]))


#: the paper's stated critic optimiser (Adam, lr 1e-4) with one update per student step and PyTorch's betas
PAPER_CRITIC: dict[str, Any] = {"critic_steps": 1, "critic_lr": 1e-4, "critic_betas": (0.9, 0.999)}


def _fit_toy_critic(tmp_path: Path, epochs: int = 4, **kw: Any) -> tuple[CriticLog, list[str]]:
    """A student that climbs the critic fast (SGD lr 0.1, adversarial weight 1) on 128 digits, 4 steps an epoch."""
    import warnings

    from kd_lightning.data import DigitsDataModule

    L.seed_everything(0, verbose=False)
    ssup = write_teacher(tmp_path / "s.ckpt", 10, 1, net="tinynet", image_size=8)
    L.seed_everything(1, verbose=False)
    dm = DigitsDataModule(batch_size=32, train_size=128, num_workers=0, augment=False)
    opt = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    model = _tiny_aikd(ssup, adversarial_weight=1.0, optimizer=opt, **kw)
    log = CriticLog()
    trainer = L.Trainer(
        max_epochs=epochs, enable_checkpointing=False, limit_val_batches=0, callbacks=[log], **QUIET_TRAINER_KW
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm)
    return log, [str(w.message) for w in caught if "critic has lost" in str(w.message)]


def test_a_lagging_critic_loses_and_more_critic_updates_fix_it(tmp_path: Path) -> None:
    # one Adam(1e-4) update per student step (the paper's stated setting): the student's logits outscore S_sup's
    lagging, warned = _fit_toy_critic(tmp_path, critic_lost_epochs=3, **PAPER_CRITIC)
    assert all(w < 0 for w in lagging.w), lagging.w
    assert len(warned) == 1 and "negative for 3 epochs in a row" in warned[0] and "critic_steps=1" in warned[0]
    assert lagging.critic_steps[:3] == [1, 2, 3]
    # our defaults, five updates per student step at lr 1e-3, betas (0, 0.9): the critic keeps up from epoch 1 on
    fixed, warned = _fit_toy_critic(tmp_path, critic_lost_epochs=3)
    assert all(w > 0 for w in fixed.w[1:]), fixed.w
    assert warned == [] and fixed.critic_steps[:3] == [5, 10, 15]
    assert all(-1.0 <= c <= 1.0 for c in lagging.cos + fixed.cos)  # the cosine is logged every epoch


def test_critic_warmup_trains_the_critic_with_the_adversarial_term_off(tmp_path: Path) -> None:
    by_steps, _ = _fit_toy_critic(tmp_path, epochs=2, critic_warmup_steps=6, critic_steps=1)
    assert by_steps.adv_weight == [0.0] * 6 + [1.0] * 2  # 4 steps an epoch
    assert by_steps.critic_steps == list(range(1, 9))  # the critic trains from the first step
    by_epochs, _ = _fit_toy_critic(tmp_path, epochs=2, critic_warmup_epochs=1, critic_steps=1)
    assert by_epochs.adv_weight == [0.0] * 4 + [1.0] * 4


def test_aikd_takes_pskds_ramp_of_the_progressive_weight(tmp_path: Path) -> None:
    ssup = write_teacher(tmp_path / "s.ckpt", 10, 1, net="tinynet", image_size=8)
    model = _tiny_aikd(ssup, progressive_ramp=True)
    trainer = L.Trainer(max_epochs=10, logger=False)
    model.trainer = trainer
    for epoch, a_p in ((0, 0.03), (4, 0.15), (9, 0.3)):  # a_P (t + 1) / T with a_P = 0.3
        trainer.fit_loop.epoch_progress.current.completed = epoch
        weights = model.loss_weights()
        assert weights["progressive"] == pytest.approx(a_p)
        assert weights["ce"] == pytest.approx(1 - a_p - 0.1) and weights["guide"] == pytest.approx(0.1)
    assert _tiny_aikd(ssup).progressive_weight_now() == pytest.approx(0.3)  # off by default: constant a_P


def test_ssup_trained_with_the_runs_seed_is_warned_about(tmp_path: Path, monkeypatch) -> None:
    from kd_lightning.methods.self_kd import pretrained_seed

    run = tmp_path / "ssup_run"
    ssup = write_teacher(run / "checkpoints/best.ckpt", 10, 1, net="tinynet", image_size=8)
    assert pretrained_seed(str(ssup)) is None  # nothing recorded: no check
    (run / "lightning_logs/version_0").mkdir(parents=True)
    (run / "lightning_logs/version_0/config.yaml").write_text("seed_everything: 3\ntrainer: {max_epochs: 1}\n")
    assert pretrained_seed(str(ssup)) == 3
    model = _tiny_aikd(ssup)
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    with pytest.warns(UserWarning, match=r"seed_everything=3, the seed of this run: the student starts from S_sup"):
        model._check_pretrained_seed(str(ssup))
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model._check_pretrained_seed(str(ssup))  # another seed: silent
    (run / "lightning_logs/version_1").mkdir()
    (run / "lightning_logs/version_1/config.yaml").write_text("seed_everything: 5\n")
    assert pretrained_seed(str(ssup)) is None  # the saved configs disagree: unknown
