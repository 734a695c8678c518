"""The Compile callback: a compiled fit trains the same net as an eager one, checkpoints are unchanged, bad
arguments and a missing C++ compiler are clear errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.callbacks import Compile
from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses import BLKD, FitNet
from kd_lightning.methods import DistillModule, ImageClassifier
from kd_lightning.methods.gan import ConditionalGAN
from kd_lightning.nets import FeatureExtractor, create_net
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


def test_compile_refuses_manual_optimisation_methods(tmp_path: Path) -> None:
    gan = ConditionalGAN(num_classes=10, z_dim=8, g_ch=4, d_ch=4, in_channels=1, image_size=8, shared_dim=8)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[Compile(modules=["generator"])])
    with pytest.raises(ConfigError, match="ConditionalGAN optimises manually"):
        trainer.fit(gan, DigitsDataModule(batch_size=16, augment=False))
    assert gan.generator._compiled_call_impl is None


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
