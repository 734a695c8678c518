"""GANs: vicinal losses against plain computations, DiffAugment, hinge/projection, training, sampling, resume."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.data import DigitsDataModule, RotatedDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.gans import (
    DCGANGenerator,
    DiffAugment,
    ResNetDiscriminator,
    ResNetGenerator,
    VicinalSampler,
    d_loss_parts,
    diff_augment,
    g_loss,
    kappa_base,
    labels_per_class,
    rule_of_thumb_sigma,
    vicinal_weights,
)
from kd_lightning.methods import DCGAN, CcGAN, ConditionalGAN, LabelEmbedding
from kd_lightning.metrics.gan import fid_from_features, intra_fid, label_consistency
from tests.helpers import GAN_ARGS, QUIET_TRAINER, QUIET_TRAINER_KW, RECIPES

LABELS = torch.tensor([0.0, 0.1, 0.15, 0.5, 0.52, 1.0])


# ---------------------------------------------------------------------- CcGAN vicinity, plain references
def test_rule_of_thumb_sigma_and_kappa_match_the_formulas() -> None:
    y = LABELS.numpy().astype(np.float64)
    assert rule_of_thumb_sigma(LABELS) == pytest.approx(1.06 * np.std(y) * len(y) ** (-1 / 5))
    assert kappa_base(LABELS) == pytest.approx(0.48)  # 1.0 - 0.52: the largest gap between sorted labels
    hard = VicinalSampler(LABELS, "hard", kappa_multiplier=2.0)
    soft = VicinalSampler(LABELS, "soft", kappa_multiplier=2.0)
    assert hard.kappa == pytest.approx(0.96) and hard.radius == pytest.approx(0.96)
    assert soft.nu == pytest.approx(1 / 0.96**2)
    assert soft.radius == pytest.approx(math.sqrt(-math.log(1e-3) / soft.nu))


def plain_weight(y: float, t: float, kind: str, kappa: float, nu: float) -> float:
    if kind == "hard":
        return 1.0 if abs(y - t) <= kappa else 0.0
    return math.exp(-nu * (y - t) ** 2)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_vicinal_weights_equal_plain_computation(kind: str) -> None:
    targets = torch.tensor([0.05, 0.12, 0.3, 0.51, 0.9, 0.0])
    kappa, nu = 0.06, 200.0
    w = vicinal_weights(LABELS, targets, kind, kappa, nu)  # type: ignore[arg-type]
    expected = [plain_weight(float(y), float(t), kind, kappa, nu) for y, t in zip(LABELS, targets)]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    if kind == "hard":
        assert w.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("loss", ["vanilla", "hinge"])
def test_vicinal_discriminator_loss_equals_plain_computation(kind: str, loss: str) -> None:
    real_logits = torch.tensor([1.5, -0.3, 0.2, 2.0])
    fake_logits = torch.tensor([-1.0, 0.4, -0.2, 1.2])
    targets = torch.tensor([0.1, 0.5, 0.5, 0.95])
    y_real = torch.tensor([0.1, 0.52, 0.5, 1.0])
    y_fake = torch.tensor([0.13, 0.47, 0.6, 0.97])
    kappa, nu = 0.05, 300.0
    w_r = vicinal_weights(y_real, targets, kind, kappa, nu)  # type: ignore[arg-type]
    w_f = vicinal_weights(y_fake, targets, kind, kappa, nu)  # type: ignore[arg-type]
    lr, lf = d_loss_parts(real_logits, fake_logits, loss, w_r, w_f)  # type: ignore[arg-type]

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    exp_r = exp_f = 0.0
    for j in range(4):
        wr = plain_weight(float(y_real[j]), float(targets[j]), kind, kappa, nu)
        wf = plain_weight(float(y_fake[j]), float(targets[j]), kind, kappa, nu)
        if loss == "vanilla":  # -(1/B) sum w log D(x, t), -(1/B) sum w log(1 - D(G(z, y'), t))
            exp_r += -wr * math.log(sig(float(real_logits[j]))) / 4
            exp_f += -wf * math.log(1 - sig(float(fake_logits[j]))) / 4
        else:
            exp_r += wr * max(0.0, 1 - float(real_logits[j])) / 4
            exp_f += wf * max(0.0, 1 + float(fake_logits[j])) / 4
    assert float(lr) == pytest.approx(exp_r, rel=1e-5) and float(lf) == pytest.approx(exp_f, rel=1e-5)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_vicinal_sampler_draws_real_and_fake_labels_inside_the_window(kind: str) -> None:
    torch.manual_seed(0)
    labels = torch.rand(500)
    v = VicinalSampler(labels, kind, kappa_multiplier=3.0)  # type: ignore[arg-type]
    t = v.targets(labels[:64])
    idx = v.real_indices(t)
    assert ((labels[idx].double() - t).abs() <= v.radius + 1e-12).all()
    fake = v.fake_labels(t)
    assert ((fake - t).abs() <= v.radius + 1e-12).all() and fake.min() >= 0 and fake.max() <= 1
    # every real label in a window is reachable: counts equal a plain count
    plain = [(abs(labels.double() - float(tj)) <= v.radius).sum().item() for tj in t[:5]]
    assert v.counts(t[:5]).tolist() == plain


def test_ccgan_draws_targets_from_the_distinct_labels_like_the_official_code() -> None:
    """improved_CcGAN draws y_j with np.random.choice(unique_train_labels): a label value seen 90 times is no
    likelier than one seen 5 times. ``target_draw: batch`` keeps the batch's labels (frequency-weighted)."""
    labels = torch.cat([torch.full((90,), 0.1), torch.full((5,), 0.5), torch.full((5,), 0.9)])
    v = VicinalSampler(labels, "hard")
    assert v.unique.tolist() == pytest.approx([0.1, 0.5, 0.9])
    draws = v.draw_unique(6000, generator=torch.Generator().manual_seed(0))
    shares = [float((draws == u).double().mean()) for u in v.unique]
    assert shares == pytest.approx([1 / 3] * 3, abs=0.03)  # uniform over values, not 0.9/0.05/0.05

    model = CcGAN(z_dim=8, g_ch=8, d_ch=8, in_channels=1, image_size=16, label_range=(0.0, 1.0))
    assert model.hparams.target_draw == "unique" and not model.hparams.clamp_generator_targets
    model.vicinal = v
    batch = {"label": torch.full((4000,), 0.1)}
    torch.manual_seed(1)
    drawn = model.base_labels(batch)
    assert 0.25 < float((drawn == 0.5).double().mean()) < 0.42  # the batch holds only 0.1
    by_batch = CcGAN(z_dim=8, g_ch=8, d_ch=8, in_channels=1, image_size=16, target_draw="batch")
    by_batch.vicinal = v
    assert torch.equal(by_batch.base_labels(batch), batch["label"].double())

    # the generator step's targets y_j + eps_j are not clamped (the reference); clamp_generator_targets clamps
    for clamp in (False, True):
        m = CcGAN(
            z_dim=8, g_ch=8, d_ch=8, in_channels=1, image_size=16, target_draw="batch", clamp_generator_targets=clamp
        )
        m.vicinal = VicinalSampler(torch.rand(50), "hard", sigma=0.5)
        m.generator.forward = lambda z, y: torch.zeros(len(z), 1, 16, 16)  # type: ignore[method-assign]
        recorded: list[torch.Tensor] = []
        m.d_logits = lambda x, c, rec=recorded: rec.append(c) or c.float()  # type: ignore[method-assign, misc]
        torch.manual_seed(2)
        m.generator_step_loss({"label": torch.ones(256)})
        torch.manual_seed(2)
        t = torch.ones(256, dtype=torch.float64) + 0.5 * torch.randn(256, dtype=torch.float64)
        expected = t.clamp(0, 1) if clamp else t
        assert torch.allclose(recorded[0].double(), expected, atol=1e-6)
        assert (recorded[0].max() > 1) != clamp


def test_vicinal_sampler_rejects_unnormalised_labels() -> None:
    with pytest.raises(ConfigError, match=r"normalised to \[0, 1\]"):
        VicinalSampler(torch.tensor([0.0, 45.0]))


# ---------------------------------------------------------------------- DiffAugment
@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diffaugment_is_differentiable_and_keeps_shape(policy: str) -> None:
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, policy)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not torch.equal(y.detach(), x.detach())


def test_diffaugment_translation_moves_pixels_and_unknown_policy_is_named() -> None:
    torch.manual_seed(1)
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    moved = diff_augment(x, "translation")
    assert (moved.sum(dim=(1, 2, 3)) <= 1).all() and not torch.equal(moved, x)
    assert DiffAugment("")(x) is x
    with pytest.raises(ConfigError, match="colour"):
        DiffAugment("colour")


# ---------------------------------------------------------------------- hinge and projection
def test_hinge_and_vanilla_losses_on_fixed_inputs() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    lr, lf = d_loss_parts(real, fake, "hinge")
    assert float(lr) == pytest.approx((0 + 0.5 + 2) / 3) and float(lf) == pytest.approx((0 + 1 + 2) / 3)
    assert float(g_loss(fake, "hinge")) == pytest.approx(1 / 3)
    lr, lf = d_loss_parts(real, fake, "vanilla")
    assert float(lr) == pytest.approx(np.mean(np.log1p(np.exp(-real.numpy()))), rel=1e-6)
    assert float(lf) == pytest.approx(np.mean(np.log1p(np.exp(fake.numpy()))), rel=1e-6)


def test_projection_discriminator_adds_the_class_embedding_term() -> None:
    torch.manual_seed(0)
    d = ResNetDiscriminator(16, 1, ch=8, condition="class", num_classes=3).eval()
    x = torch.randn(4, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 1])
    out = d(x, y)
    h = d.features(x)
    assert torch.allclose(out, d.linear(h).squeeze(1) + (d.embed(y) * h).sum(1), atol=1e-5)
    assert not torch.allclose(out, d(x, torch.tensor([1, 2, 0, 0])))
    nli = ResNetDiscriminator(16, 1, ch=8, condition="continuous").eval()
    yc = torch.tensor([0.1, 0.5, 0.9, 0.0])
    h = nli.features(x)
    w = nli.embed.weight.view(-1)  # (y + 1) <w, h>
    assert torch.allclose(nli(x, yc), nli.linear(h).squeeze(1) + (yc + 1) * (h @ w), atol=1e-5)
    g = ResNetGenerator(16, 1, z_dim=8, ch=4, condition="continuous").eval()
    z = torch.randn(2, 8)
    assert not torch.allclose(g(z, torch.tensor([0.0, 0.0])), g(z, torch.tensor([0.0, 1.0])))


@pytest.mark.parametrize("size", [16, 28, 32, 64])
def test_generator_and_discriminator_sizes(size: int) -> None:
    g = ResNetGenerator(size, 3, z_dim=8, ch=4, condition="class", num_classes=5)
    d = ResNetDiscriminator(size, 3, ch=4, condition="class", num_classes=5)
    y = torch.tensor([0, 4])
    x = g(torch.randn(2, 8), y)
    assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
    assert d(x, y).shape == (2,)
    assert DCGANGenerator(10, size, 1, ch=4)(torch.randn(2, 10)).shape == (2, 1, size, size)


# ---------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_batched_and_checks_labels() -> None:
    g = ResNetGenerator(16, 1, z_dim=8, ch=4, condition="class", num_classes=3)
    y = labels_per_class(4, 3)
    a = g.sample(y, seed=7, batch_size=5)
    b = g.sample(y, seed=7, batch_size=12, progress=True)
    assert a.shape == (12, 1, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-6)  # same seed, different batching
    assert not torch.allclose(a, g.sample(y, seed=8))
    z = torch.randn(12, 8)
    assert torch.allclose(g.sample(y, z=z), g.sample(y, z=z))
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        g.sample(torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="one label per image"):
        g.sample(5)
    assert g.training  # sampling restores the mode
    u = DCGANGenerator(10, 16, 1, ch=4)
    assert u.sample(6, seed=0).shape == (6, 1, 16, 16)


# ---------------------------------------------------------------------- metrics
def test_fid_and_intra_fid_and_label_consistency() -> None:
    torch.manual_seed(0)
    real = torch.randn(400, 4)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-4)
    shifted = real + torch.tensor([1.0, 0, 0, 0])
    assert fid_from_features(real, shifted) == pytest.approx(1.0, abs=1e-3)  # |mu diff|^2, same covariance
    labels = torch.arange(400) % 2
    fake = torch.where(labels[:, None] == 0, real, shifted)
    mean, per = intra_fid(real, labels, fake, labels)
    assert per[0] == pytest.approx(0.0, abs=1e-4) and per[1] == pytest.approx(1.0, abs=1e-3)
    assert mean == pytest.approx(0.5, abs=1e-3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert label_consistency(logits, torch.tensor([0, 1, 1, 1])) == 0.75


# ---------------------------------------------------------------------- training
class StepLog(L.Callback):
    def __init__(self) -> None:
        self.d: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.d.append(float(trainer.callback_metrics["train/d_loss_step"]))


def tiny_trainer(tmp_path: Path, steps: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        enable_checkpointing=False,
        **QUIET_TRAINER_KW,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
    )


def digits_gan(**kw: Any) -> ConditionalGAN:
    return ConditionalGAN(
        z_dim=16,
        g_ch=8,
        d_ch=8,
        num_classes=10,
        in_channels=1,
        image_size=16,
        mean=(0.3,),
        std=(0.4,),
        diffaugment="color,translation,cutout",
        ema_decay=0.9,
        **kw,
    )


def test_conditional_gan_trains_on_digits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32, image_size=16, augment=False)
    model = digits_gan(n_critic=2)
    g0 = {k: v.clone() for k, v in model.generator.state_dict().items()}
    log = StepLog()
    trainer = tiny_trainer(tmp_path, 30, log)
    trainer.fit(model, datamodule=dm)
    # 30 optimiser steps with n_critic 2: 20 discriminator and 10 generator updates
    assert int(model.d_steps) == 20 and int(model.g_steps) == 10 and trainer.global_step == 30
    assert all(math.isfinite(v) for v in log.d)
    assert min(log.d[-5:]) < log.d[0]  # the discriminator learns
    assert any(not torch.equal(g0[k], v) for k, v in model.generator.state_dict().items())
    raw, ema = model.generator.state_dict(), model.generator_ema.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    samples = model.sample(labels_per_class(2, 10), seed=0)
    assert samples.shape == (20, 1, 16, 16) and torch.isfinite(samples).all()
    assert not any(p.requires_grad for p in model.generator_ema.parameters())


def test_ccgan_trains_on_rotated_digits_with_hvdl_svdl_and_ili(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = RotatedDataModule(DigitsDataModule(), batch_size=32, image_size=16, augment=False)
    emb = LabelEmbedding(
        net="tinynet", embed_dim=16, embed_epochs=1, in_channels=1, image_size=16, label_range=(-45.0, 45.0)
    )
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        accelerator="cpu",
        **QUIET_TRAINER_KW,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(emb, datamodule=dm)
    # the y2h phase draws its labels from the distinct training labels, as the official code
    from kd_lightning.data.base import dataset_labels

    assert torch.equal(emb._unique_labels, torch.unique(dataset_labels(dm.train_dataset).float().flatten()))
    ckpt = tmp_path / "emb.ckpt"
    trainer.save_checkpoint(ckpt)
    for vicinity, label_input in (("hard", "nli"), ("soft", "ili")):
        model = CcGAN(
            vicinity=vicinity,
            label_input=label_input,
            embedding_checkpoint=str(ckpt),
            embed_dim=16,
            z_dim=8,
            g_ch=8,
            d_ch=8,
            in_channels=1,
            image_size=16,
            label_range=(-45.0, 45.0),
        )
        log = StepLog()
        tiny_trainer(tmp_path, 6, log).fit(model, datamodule=dm)
        assert all(math.isfinite(v) for v in log.d) and int(model.g_steps) == 3
        v = model.vicinal
        assert v is not None and v.sigma == pytest.approx(rule_of_thumb_sigma(v.labels))
        out = model.sample(torch.linspace(0, 1, 5), seed=0)
        assert out.shape == (5, 1, 16, 16) and torch.isfinite(out).all()
    # the ILI generator carries the embedding loaded from the stage's checkpoint
    assert torch.equal(model.generator.label_embed.net[0].weight, emb.y2h.net[0].weight)


def test_dcgan_latent_dimension_is_a_parameter(tmp_path: Path) -> None:
    model = DCGAN(z_dim=10, g_ch=8, d_ch=8, in_channels=1, image_size=16, num_classes=10)
    tiny_trainer(tmp_path, 4).fit(model, datamodule=DigitsDataModule(batch_size=32, image_size=16, augment=False))
    assert model.generator.linear.in_features == 10 and int(model.g_steps) == 2
    assert torch.isfinite(model.sample(4, seed=0)).all()


def test_fashion_gan_recipes_train_and_their_checkpoints_sample(kdl, fake_mnist: Path, tmp_path: Path) -> None:
    quiet = QUIET_TRAINER
    root = ["--data.init_args.datamodule.init_args.root", str(fake_mnist)]
    assert (
        kdl(
            "fit", "--config", str(RECIPES / "fashion_mnist/ccgan_embedding.yaml"), "--trainer.fast_dev_run", "1", *root
        )
        == 0
    )
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / "fashion_mnist/ccgan_rotated.yaml"),
            "--trainer.max_steps",
            "2",
            *root,
            "--trainer.default_root_dir",
            "cc",
            *quiet,
        )
        == 0
    )
    ckpt = str(tmp_path / "cc/checkpoints/last.ckpt")
    assert (
        kdl(
            "sample",
            "--ckpt",
            ckpt,
            "--per_label",
            "2",
            "--label_values",
            "0",
            "0.5",
            "1",
            "--out",
            "cc.pt",
            "--no_progress",
        )
        == 0
    )
    saved = torch.load(tmp_path / "cc.pt", weights_only=False)
    assert saved["images"].shape == (6, 1, 28, 28)
    assert saved["labels"].tolist() == pytest.approx([-45.0, -45.0, 0.0, 0.0, 45.0, 45.0])  # original units
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / "fashion_mnist/dcgan_latent10.yaml"),
            "--trainer.max_steps",
            "2",
            "--data.init_args.root",
            str(fake_mnist),
            "--trainer.default_root_dir",
            "dc",
            *quiet,
        )
        == 0
    )
    assert (
        kdl(
            "sample",
            "--ckpt",
            str(tmp_path / "dc/checkpoints/last.ckpt"),
            "--n",
            "5",
            "--out",
            "dc.pt",
            "--no_progress",
        )
        == 0
    )
    assert torch.load(tmp_path / "dc.pt", weights_only=False)["images"].shape == (5, 1, 32, 32)


class SigtermAt(L.Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_gan_resume_is_exact_and_sample_command_writes_counts(kdl, kdl_callbacks, tmp_path: Path, monkeypatch) -> None:
    from kd_lightning.callbacks import EXIT_SIGTERM

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args = [*GAN_ARGS, "--trainer.max_steps", "12"]
    assert kdl("fit", *args, "--trainer.default_root_dir", "ref") == 0
    kdl_callbacks[:] = [SigtermAt(3)]
    assert kdl("fit", *args, "--trainer.default_root_dir", "run") == EXIT_SIGTERM
    assert load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 8  # 4 batches x (D + G)
    kdl_callbacks.clear()
    assert kdl("fit", *args, "--trainer.default_root_dir", "run", "--ckpt_path", "last") == 0
    ref, res = (load_checkpoint(tmp_path / f"{r}/checkpoints/last.ckpt") for r in ("ref", "run"))
    assert ref["global_step"] == res["global_step"] == 12
    assert len(res["optimizer_states"]) == 2
    assert any(k.startswith("generator_ema.") for k in res["state_dict"])
    differing = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], res["state_dict"][k])]
    assert not differing, f"resumed GAN differs in {differing[:5]}"
    for i in range(2):
        for a, b in zip(ref["optimizer_states"][i]["state"].values(), res["optimizer_states"][i]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))

    # the sampling command: N per class into a tensor file and into a folder; same seed, same images
    ckpt = str(tmp_path / "ref/checkpoints/last.ckpt")
    assert kdl("sample", "--ckpt", ckpt, "--per_class", "3", "--out", "s.pt", "--no_progress") == 0
    assert kdl("sample", "--ckpt", ckpt, "--per_class", "3", "--out", "again.pt", "--no_progress") == 0
    saved = torch.load(tmp_path / "s.pt", weights_only=False)
    assert saved["images"].shape == (30, 1, 16, 16) and saved["images"].dtype == torch.uint8
    assert torch.bincount(saved["labels"]).tolist() == [3] * 10
    assert torch.equal(saved["images"], torch.load(tmp_path / "again.pt", weights_only=False)["images"])
    assert kdl("sample", "--ckpt", ckpt, "--per_class", "2", "--out", "folder", "--no_progress") == 0
    assert sorted(len(list(p.glob("*.png"))) for p in (tmp_path / "folder").iterdir()) == [2] * 10
    assert not list(tmp_path.rglob(".tmp-*"))
    assert kdl("sample", "--ckpt", ckpt, "--n", "3", "--out", "x.pt") == 2  # class-conditional needs --per_class


TINY = [
    "--model.init_args.g_ch",
    "4",
    "--model.init_args.d_ch",
    "4",
    "--model.init_args.z_dim",
    "8",
    *QUIET_TRAINER,
]


def test_cifar100_template_fast_dev_run(kdl, tmp_path: Path) -> None:
    from tests.fake_datasets import write_cifar

    root = write_cifar(tmp_path / "c100", hundred=True)
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / "cifar100/cgan.yaml"),
            "--data.init_args.root",
            str(root),
            "--data.init_args.batch_size",
            "8",
            "--trainer.fast_dev_run",
            "1",
            *TINY,
        )
        == 0
    )


@pytest.mark.parametrize("dataset", ["utkface", "steering_angle"])
def test_ccgan_templates_run_both_ili_stages(kdl, tmp_path: Path, dataset: str) -> None:
    from tests.fake_datasets import write_steering, write_utkface

    root = write_utkface(tmp_path / "d") if dataset == "utkface" else write_steering(tmp_path / "d")[0]
    common = [
        "--data.init_args.root",
        str(root),
        "--data.init_args.batch_size",
        "8",
        *QUIET_TRAINER,
    ]
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / dataset / "ccgan_embedding.yaml"),
            *common,
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_train_batches",
            "1",
            "--model.init_args.embed_epochs",
            "1",
            "--model.init_args.net",
            "tinynet",
        )
        == 0
    )
    emb = tmp_path / "runs" / dataset / "ccgan_embedding" / "checkpoints" / "last.ckpt"
    assert emb.is_file()
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / dataset / "ccgan.yaml"),
            *common,
            *TINY[:6],
            "--model.init_args.embedding_checkpoint",
            str(emb),
            "--trainer.fast_dev_run",
            "2",
        )
        == 0
    )


def test_nan_guard_names_the_discriminator_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_lightning.callbacks import NaNGuard, NonFiniteLossError

    model = digits_gan()
    original = model.discriminator_step_losses

    def broken(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = original(batch)
        return {"real": parts["real"], "fake": parts["fake"] * float("nan")}

    monkeypatch.setattr(model, "discriminator_step_losses", broken)
    before = {k: v.detach().clone() for k, v in model.discriminator.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="train/d/fake"):
        tiny_trainer(tmp_path, 4, NaNGuard()).fit(model, datamodule=DigitsDataModule(batch_size=32, image_size=16))
    after = dict(model.discriminator.named_parameters())  # (spectral-norm power iterations do move buffers)
    assert all(torch.equal(before[k], after[k]) for k in before)  # stopped before the optimiser step


def small_teacher(tmp_path: Path, regression: bool) -> Path:
    from kd_lightning.methods import ImageClassifier, ImageRegressor

    if regression:
        dm: L.LightningDataModule = RotatedDataModule(DigitsDataModule(), batch_size=32, image_size=16)
        teacher = ImageRegressor(net="tinynet", in_channels=1, image_size=16, label_range=(-45.0, 45.0))
    else:
        dm = DigitsDataModule(batch_size=32, image_size=16)
        teacher = ImageClassifier(net="tinynet", num_classes=10, in_channels=1, image_size=16)
    trainer = tiny_trainer(tmp_path, 2)
    trainer.fit(teacher, datamodule=dm)
    path = tmp_path / f"teacher_{regression}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("regression", [False, True], ids=["class", "ccgan"])
def test_gan_quality_callback_logs_metrics_and_writes_grids(tmp_path: Path, regression: bool) -> None:
    from kd_lightning.callbacks import GANQuality

    teacher = small_teacher(tmp_path, regression)
    if regression:
        dm: L.LightningDataModule = RotatedDataModule(DigitsDataModule(), batch_size=32, image_size=16)
        model: L.LightningModule = CcGAN(
            z_dim=8, g_ch=4, d_ch=4, in_channels=1, image_size=16, label_range=(-45.0, 45.0)
        )
    else:
        dm = DigitsDataModule(batch_size=32, image_size=16)
        torch.manual_seed(0)
        model = digits_gan()
    cb = GANQuality(
        teacher=str(teacher),
        every_n_steps=2,
        n_per_class=3,
        n_label_values=4,
        grid_per_class=2,
        dirpath=str(tmp_path / "samples"),
    )
    tiny_trainer(tmp_path, 4, cb).fit(model, datamodule=dm)
    assert [h["step"] for h in cb.history] == [2, 4]
    keys = (
        {"quality/fid", "quality/label_mae"}
        if regression
        else {"quality/fid", "quality/intra_fid", "quality/label_consistency"}
    )
    assert set(cb.history[-1]) - {"step"} == keys
    assert all(math.isfinite(v) for h in cb.history for k, v in h.items())
    if not regression:
        assert 0 <= cb.history[-1]["quality/label_consistency"] <= 1
    assert (tmp_path / "samples/step0000002.png").is_file() and (tmp_path / "samples/latest.png").is_file()
    assert (tmp_path / "samples/quality.json").is_file()
    if not regression:  # the evaluation draws nothing from the global RNGs: the same run without it ends equal
        torch.manual_seed(0)
        plain = digits_gan()
        tiny_trainer(tmp_path, 4).fit(plain, datamodule=DigitsDataModule(batch_size=32, image_size=16))
        ours = model.generator.state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in plain.generator.state_dict().items())


def test_ema_averages_the_whole_state_dict_like_biggan() -> None:
    """BigGAN's ema.update averages every state-dict entry (BN running statistics included);
    ``ema_buffers: copy`` averages the parameters only and copies the buffers."""
    for mode in ("average", "copy"):
        model = DCGAN(z_dim=4, g_ch=4, d_ch=4, in_channels=1, image_size=16, ema_decay=0.9, ema_buffers=mode)
        model.g_steps += 1
        before = {k: v.clone() for k, v in model.generator_ema.state_dict().items()}
        with torch.no_grad():
            for t in model.generator.state_dict().values():
                t.add_(1) if t.is_floating_point() else t.add_(3)
        source = model.generator.state_dict()
        model.update_ema()
        after = model.generator_ema.state_dict()
        for k, v in after.items():
            if not v.is_floating_point():  # num_batches_tracked: copied
                assert torch.equal(v, source[k]), k
            elif k in dict(model.generator_ema.named_parameters()) or mode == "average":
                assert torch.allclose(v, 0.9 * before[k] + 0.1 * source[k], atol=1e-6), k
            else:
                assert torch.equal(v, source[k]), k
        assert any("running_mean" in k for k in after)
    with pytest.raises(ConfigError, match="ema_buffers='last'"):
        DCGAN(in_channels=1, image_size=16, ema_buffers="last")  # type: ignore[arg-type]


def test_upsample2_equals_nearest_interpolation_bit_for_bit_forward_and_backward() -> None:
    import torch.nn.functional as F

    from kd_lightning.gans.resnet import upsample2

    torch.manual_seed(0)
    for shape in [(5, 16, 7, 7), (3, 8, 14, 14)]:
        a = torch.randn(shape, requires_grad=True)
        b = a.detach().clone().requires_grad_(True)
        ref, out = F.interpolate(a, scale_factor=2, mode="nearest"), upsample2(b)
        assert torch.equal(ref, out) and out.is_contiguous()  # NCHW in, NCHW out
        g = torch.randn_like(ref)
        ref.backward(g)
        out.backward(g)
        assert torch.equal(a.grad, b.grad)
    cl = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert upsample2(cl).is_contiguous(memory_format=torch.channels_last)  # a channels-last input stays so
