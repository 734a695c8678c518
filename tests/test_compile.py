"""The Compile callback: a compiled fit trains the same net as an eager one (supervised, distillation and the
manually optimised GANs), checkpoints are unchanged, bad arguments, a net that cannot be compiled and a missing C++
compiler are clear errors; GANs also train under bf16-mixed."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.callbacks import Compile
from kd_lightning.data import DigitsDataModule, RotatedDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.gans import ResNetDiscriminator
from kd_lightning.gans.spectral_norm import spectral_norm
from kd_lightning.losses import BLKD, FitNet
from kd_lightning.methods import DistillModule, ImageClassifier
from kd_lightning.methods.gan import DCGAN, CcGAN, ConditionalGAN, GANTask
from kd_lightning.methods.self_kd import SelfKD
from kd_lightning.nets import FeatureExtractor, create_net
from tests.blackbox_helpers import digits8_teacher  # noqa: F401  (module-scoped fixture)
from tests.helpers import DIGITS_STUDENT, QUIET, digits_classifier, digits_student, quiet_trainer, write_teacher


def _fit(tmp_path: Path, compiled: bool) -> ImageClassifier:
    L.seed_everything(0)
    model, dm = digits_classifier()
    callbacks = [Compile()] if compiled else []
    quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=callbacks).fit(model, dm)
    return model


def _compiled_paths(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def test_compiled_fit_matches_eager_and_keeps_checkpoint_keys(tmp_path: Path) -> None:
    eager = _fit(tmp_path / "eager", compiled=False)
    compiled = _fit(tmp_path / "compiled", compiled=True)
    assert _compiled_paths(compiled) == ["net"] and _compiled_paths(eager) == []
    start = digits_classifier()[0].state_dict()
    ours, theirs = compiled.state_dict(), eager.state_dict()
    assert list(ours) == list(theirs)  # nn.Module.compile adds no "_orig_mod." prefix: checkpoints load either way
    moved = [k for k in ours if ours[k].is_floating_point() and not torch.equal(ours[k], start[k])]
    assert len(moved) > 4  # 4 Adam steps changed the weights ...
    for k in ours:  # ... exactly as eager did, up to the rounding of other kernels
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)
    x = torch.rand(5, 1, 8, 8)
    compiled.eval(), eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_feature_hooks_see_the_compiled_nets_features() -> None:
    torch.manual_seed(0)
    net = create_net("tinynet", num_classes=10, in_channels=1)
    x = torch.rand(6, 1, 8, 8)
    with FeatureExtractor(net, ["stage1", "penultimate"]) as fe:
        out, feats = fe(x)
    net.compile(dynamic=False)  # what Compile does; hooks registered afterwards (as KD losses do)
    with FeatureExtractor(net, ["stage1", "penultimate"]) as fe:
        out_c, feats_c = fe(x)
    assert net._compiled_call_impl is not None
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    assert feats_c.keys() == feats.keys() == {"stage1", "penultimate"}
    for k in feats:
        torch.testing.assert_close(feats_c[k], feats[k], rtol=1e-4, atol=1e-5)


def test_compile_rejects_bad_arguments_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mode='fast'.*expected one of"):
        Compile(mode="fast")
    with pytest.raises(ConfigError, match="compiles nothing"):
        Compile(modules=[])
    model, dm = digits_classifier()
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[Compile(modules=["student"])])
    with pytest.raises(ConfigError, match=r"no submodule 'student'.*\['normalize', 'net'"):
        trainer.fit(model, dm)


def test_compile_without_a_cpp_compiler_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler++")
    model, dm = digits_classifier()
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[Compile()])
    message = r"Compile needs a C\+\+ compiler.*'no-such-compiler\+\+' is not on PATH; install one"
    with pytest.raises(ConfigError, match=message):
        trainer.fit(model, dm)
    assert model.net._compiled_call_impl is None


@pytest.mark.slow
def test_compile_from_the_command_line_checkpoint_loads_uncompiled(kdl, tmp_path: Path) -> None:
    rc = kdl(
        "fit",
        "--config",
        str(DIGITS_STUDENT),
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.callbacks+=kd_lightning.callbacks.Compile",
        *QUIET,
    )
    assert rc == 0
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    model = ImageClassifier.load_from_checkpoint(ckpt)
    assert model.net._compiled_call_impl is None
    keys = torch.load(ckpt, weights_only=False)["state_dict"]
    assert "net.conv1.weight" in keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow
def test_compiled_student_and_teacher_distil_as_eager_ones(tmp_path: Path) -> None:
    teacher = write_teacher(tmp_path / "teacher.ckpt", 10, image_size=8)
    dm = DigitsDataModule(batch_size=32, augment=False)

    def fit(compiled: bool) -> DistillModule:
        L.seed_everything(0)
        model = digits_student(teacher, [BLKD(), FitNet(weight=1.0)], dm)  # FitNet reads features through hooks
        callbacks = [Compile(modules=["net", "teacher.net"])] if compiled else []
        quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=callbacks).fit(model, dm)
        return model

    eager, compiled = fit(False), fit(True)
    assert _compiled_paths(compiled) == ["net", "teacher.net"]
    ours, theirs = compiled.state_dict(), eager.state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------- GANs
def _sgd(params) -> torch.optim.Optimizer:
    """Plain SGD, so that weights differ from eager ones by the kernels' rounding only (Adam's first steps are
    ~lr * sign(grad), which turns a rounding difference in a near-zero gradient into a full step)."""
    return torch.optim.SGD(params, lr=0.01)


def _gan(kind: str, **kw) -> tuple[GANTask, L.LightningDataModule]:
    common = dict(z_dim=8, g_ch=4, d_ch=4, in_channels=1, image_size=16, ema_decay=0.9, diffaugment="color,cutout")
    common |= dict(generator_optimizer=_sgd, discriminator_optimizer=_sgd) | kw
    if kind == "ccgan":
        dm = RotatedDataModule(DigitsDataModule(), batch_size=16, image_size=16)
        return CcGAN(label_range=(-45.0, 45.0), **common), dm
    dm = DigitsDataModule(batch_size=16, image_size=16, augment=False)
    if kind == "dcgan":
        return DCGAN(num_classes=10, **common), dm
    return ConditionalGAN(num_classes=10, shared_dim=8, **common), dm


class _Losses(L.Callback):
    """The discriminator and generator losses of every step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values += [float(trainer.callback_metrics[k]) for k in ("train/d_loss_step", "train/g_loss_step")]


def _fit_gan(tmp_path: Path, kind: str, steps: int = 6, compiled: bool = False, **trainer_kw) -> tuple[GANTask, list]:
    L.seed_everything(0)
    gan, dm = _gan(kind)
    losses = _Losses()
    callbacks = [losses, *([Compile(modules=["generator", "discriminator"])] if compiled else [])]
    quiet_trainer(tmp_path, max_steps=steps, callbacks=callbacks, **trainer_kw).fit(gan, dm)
    return gan, losses.values


def test_spectral_norm_trains_as_pytorchs_parametrization() -> None:
    """Our spectral norm (power iteration before the forward) gives PyTorch's values bit for bit, two forwards per
    backward included, and keeps its state-dict keys (older checkpoints load)."""
    from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

    def train(sn) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            sn(torch.nn.Conv2d(2, 4, 3)), torch.nn.ReLU(), torch.nn.Flatten(), sn(torch.nn.Linear(16, 1))
        )
        if sn is spectral_norm:
            from kd_lightning.gans.spectral_norm import power_iteration_hook

            power_iteration_hook(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            real, fake = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
            loss = torch.relu(1 - net(real)).mean() + torch.relu(1 + net(fake)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        return net.state_dict(), net(real)

    ours, out = train(spectral_norm)
    theirs, out_theirs = train(torch_spectral_norm)
    assert list(ours) == list(theirs) and "0.parametrizations.weight.0._u" in ours
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert torch.equal(out, out_theirs)


@pytest.mark.slow
def test_compiled_discriminator_backpropagates_through_two_forwards() -> None:
    """The failure that made Compile refuse the GANs: D(real) and D(fake) before one backward, compiled. PyTorch's
    spectral norm fails here ("modified by an inplace operation": the compiled graph saves the u/v buffers that
    the second forward overwrites)."""
    torch.manual_seed(0)
    d = ResNetDiscriminator(8, 1, 4, "class", 10)
    d.compile(dynamic=False)
    for _ in range(2):
        y = torch.randint(0, 10, (4,))
        loss = (
            torch.relu(1 - d(torch.randn(4, 1, 8, 8), y)).mean() + torch.relu(1 + d(torch.randn(4, 1, 8, 8), y)).mean()
        )
        d.zero_grad()
        loss.backward()
        assert math.isfinite(float(loss))
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cgan", "ccgan", "dcgan"])
def test_compiled_gans_train_as_eager_ones(tmp_path: Path, kind: str) -> None:
    eager, eager_losses = _fit_gan(tmp_path / "eager", kind)
    compiled, losses = _fit_gan(tmp_path / "compiled", kind, compiled=True)
    assert _compiled_paths(compiled) == ["generator", "discriminator"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    ours, theirs = compiled.state_dict(), eager.state_dict()
    assert list(ours) == list(theirs)
    start = _gan(kind)[0].state_dict()
    assert sum(not torch.equal(ours[k], start[k]) for k in ours if ours[k].is_floating_point()) > 10
    for k in ours:  # both nets, the EMA copy and the spectral norms' u, v
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_compiled_gan_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """A compiled run's checkpoint has the eager keys, and resuming it compiled trains as resuming it eagerly."""
    L.seed_everything(0)
    gan, dm = _gan("cgan")
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[Compile(modules=["generator", "discriminator"])])
    trainer.fit(gan, dm)
    ckpt = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(ckpt)
    assert not any("_orig_mod" in k for k in torch.load(ckpt, weights_only=False)["state_dict"])

    def resume(compiled: bool) -> GANTask:
        L.seed_everything(1)
        gan, dm = _gan("cgan")
        callbacks = [Compile(modules=["generator", "discriminator"])] if compiled else []
        quiet_trainer(tmp_path / "resume", max_steps=8, callbacks=callbacks).fit(gan, dm, ckpt_path=str(ckpt))
        return gan

    eager, compiled = resume(False), resume(True)
    assert int(compiled.d_steps) == int(compiled.g_steps) == 4
    ours, theirs = compiled.state_dict(), eager.state_dict()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("kind", ["cgan", "ccgan", "dcgan"])
def test_bf16_mixed_gans_train_with_finite_losses_near_fp32(tmp_path: Path, kind: str) -> None:
    fp32, fp32_losses = _fit_gan(tmp_path / "fp32", kind)
    bf16, losses = _fit_gan(tmp_path / "bf16", kind, precision="bf16-mixed")
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    scale = max(abs(v) for v in fp32_losses)
    assert losses == pytest.approx(fp32_losses, abs=0.02 * scale)  # bf16 keeps 8 bits of mantissa
    ours, theirs, start = bf16.state_dict(), fp32.state_dict(), _gan(kind)[0].state_dict()
    params = dict(fp32.named_parameters())
    # weights stay fp32 (autocast casts on the fly) and take fp32's steps, up to bf16's rounding compounded by the
    # game (~12 % of a step here)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
        step = (theirs[k] - start[k]).norm() if k in params else 0
        if step > 0:  # parameters (BN statistics of 16 images and the power iteration's vectors are noisier)
            assert (ours[k] - theirs[k]).norm() <= 0.25 * step, (k, float((ours[k] - theirs[k]).norm() / step))


def test_compile_refuses_a_net_that_needs_double_backward(tmp_path: Path) -> None:
    """AI-KD's critic: its gradient penalty differentiates it twice, which compiled modules cannot (measured:
    "torch.compile with aot_autograd does not currently support double backward")."""
    assert "critic" in SelfKD.compile_refused
    model, dm = digits_classifier()
    model.compile_refused = {"net": "for this test"}  # the same check on a module the test can build fast
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[Compile()])
    with pytest.raises(
        ConfigError, match=r"Compile\(modules=\['net'\]\): ImageClassifier's 'net' cannot be compiled: for"
    ):
        trainer.fit(model, dm)
    assert model.net._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_mekd_deprivatization_trains_as_eager(digits8_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    """MEKD's DCGAN with the black-box teacher's L_IM term: the teacher is queried outside the compiled nets."""
    from kd_lightning.data import DigitsEdgeCloud
    from kd_lightning.methods import MEKDDeprivatization

    def fit(compiled: bool) -> MEKDDeprivatization:
        L.seed_everything(0)
        model = MEKDDeprivatization(
            teacher=str(digits8_teacher),
            num_classes=10,
            in_channels=1,
            image_size=8,
            g_ch=8,
            d_ch=8,
            im_batch_size=8,
            journal="",
            generator_optimizer=_sgd,
            discriminator_optimizer=_sgd,
        )
        callbacks = [Compile(modules=["generator", "discriminator"])] if compiled else []
        trainer = quiet_trainer(tmp_path / str(compiled), max_steps=6, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, DigitsEdgeCloud(part="edge", batch_size=16, augment=False))
        return model

    eager, compiled = fit(False), fit(True)
    assert _compiled_paths(compiled) == ["generator", "discriminator"]
    ours, theirs = compiled.state_dict(), eager.state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compile_accepts_manually_optimised_methods(tmp_path: Path) -> None:
    """Compile used to refuse every method with manual optimisation; now it compiles their nets (lazily: the
    compilation itself happens at the first call, covered by the slow tests above)."""
    gan, _ = _gan("cgan")
    assert not gan.automatic_optimization
    Compile(modules=["generator", "discriminator"]).setup(quiet_trainer(tmp_path), gan, "fit")
    assert _compiled_paths(gan) == ["generator", "discriminator"]
