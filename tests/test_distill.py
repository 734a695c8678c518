"""DistillModule and FrozenTeacher: every loss trains a student, gradients stop at the teacher, checks are clear."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.checkpoints import TRUST_ENV
from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.losses import AT, BLKD, CRD, RKD, FitNet, get_loss, list_losses
from kd_lightning.methods import DistillModule, ImageClassifier
from kd_lightning.teachers import FrozenTeacher
from tests.helpers import (
    DigitValue,
    digit_value_regressor,
    digits_classifier,
    digits_student,
    fit_and_save,
    quiet_trainer,
)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    L.seed_everything(0)
    model, dm = digits_classifier()
    return fit_and_save(model, dm, tmp_path_factory.mktemp("teacher") / "teacher.ckpt", max_epochs=3)


@pytest.fixture(scope="module")
def value_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    L.seed_everything(0)
    model, dm = digit_value_regressor()
    return fit_and_save(model, dm, tmp_path_factory.mktemp("regressor") / "regressor.ckpt", max_epochs=2)


def test_frozen_teacher_matches_its_classifier_and_stays_frozen(digits_teacher: Path) -> None:
    teacher = FrozenTeacher.from_checkpoint(digits_teacher)
    original = ImageClassifier.load_from_checkpoint(digits_teacher).eval()
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(teacher(x), original(x), atol=1e-5)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.task == "classification" and teacher.num_classes == 10 and teacher.net_name == "tinynet"


def test_frozen_teacher_from_a_state_dict_file(digits_teacher: Path, tmp_path: Path) -> None:
    original = ImageClassifier.load_from_checkpoint(digits_teacher).eval()
    torch.save(original.net.state_dict(), tmp_path / "w.pt")
    teacher = FrozenTeacher.from_weights(
        "tinynet",
        tmp_path / "w.pt",
        num_classes=10,
        in_channels=1,
        mean=original.hparams.mean,
        std=original.hparams.std,
    )
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(teacher(x), original(x), atol=1e-5)
    with pytest.raises(CheckpointError, match="do not fit net 'resnet8'"):
        FrozenTeacher.from_weights("resnet8", tmp_path / "w.pt", num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match="does not exist"):
        FrozenTeacher.from_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_trains_a_student_and_never_the_teacher(name: str, digits_teacher: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = digits_student(digits_teacher, [get_loss(name)()])
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    connectors_before = {  # tensors only: a per-sample store is the module's extra state, a dict
        k: v.clone() for k, v in model.kd_terms.state_dict().items() if isinstance(v, torch.Tensor)
    }
    logged: dict[str, float] = {}

    class Grads(L.Callback):
        def on_after_backward(self, trainer: L.Trainer, pl_module: DistillModule) -> None:
            assert all(p.grad is None for p in pl_module.teacher.parameters())
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pl_module.net.parameters())
            own = [p for p in pl_module.kd_terms.parameters()]
            if own:  # the loss's connectors learn with the student
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)

        def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    quiet_trainer(tmp_path, max_steps=2, callbacks=[Grads()], limit_val_batches=0).fit(
        model, DigitsDataModule(batch_size=32, augment=False)
    )
    assert model.teacher.training is False
    for k, v in model.teacher.state_dict().items():  # BN running statistics included
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in model.net.state_dict().items())
    if connectors_before:
        assert any(
            not torch.equal(v, connectors_before[k])
            for k, v in model.kd_terms.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )
    kd_key = f"train/kd/{model.kd_names[0]}_step"
    assert {"train/loss_step", "train/task_step", kd_key} <= set(logged)
    weight = model.kd_terms[0].weight
    assert logged["train/loss_step"] == pytest.approx(logged["train/task_step"] + weight * logged[kd_key], rel=1e-4)


def test_teacher_stays_in_eval_mode_through_fit_and_validation(digits_teacher: Path, tmp_path: Path) -> None:
    model = digits_student(digits_teacher, [BLKD()])
    modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: DistillModule, *a) -> None:
            modes.append((pl_module.training, pl_module.teacher.training))

    quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[Spy()]).fit(
        model, DigitsDataModule(batch_size=32, augment=False)
    )
    assert modes and all(student_mode and not teacher_mode for student_mode, teacher_mode in modes)


def test_blkd_student_learns_digits_from_its_teacher(digits_teacher: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=32, augment=False)
    model = digits_student(
        digits_teacher, [BLKD(T=4, weight=0.9)], dm, task_weight=0.1, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    trainer = quiet_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, dm)
    assert trainer.test(model, dm, verbose=False)[0]["test/acc1"] > 0.6  # chance is 0.1


def test_teacher_cache_runs_the_teacher_once_per_sample(digits_teacher: Path, tmp_path: Path) -> None:
    calls = []
    results = {}
    for cache in (False, True):
        L.seed_everything(0)
        model = digits_student(digits_teacher, [BLKD(), FitNet()], cache_teacher=cache)
        handle = model.teacher.net.register_forward_hook(lambda m, i, o: calls.append(len(o)))
        calls.clear()
        dm = DigitsDataModule(batch_size=64, augment=False, train_size=250)  # 3 full batches an epoch
        quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=0).fit(model, dm)
        handle.remove()
        results[cache] = (sum(calls), {k: v.clone() for k, v in model.net.state_dict().items()})
    assert results[False][0] == 3 * 3 * 64  # 3 epochs, every batch every epoch
    # once per distinct sample: the 58 left out of each epoch's batches differ between epochs
    assert 192 < results[True][0] <= 250
    for k, v in results[False][1].items():  # and the student ends the same
        assert torch.allclose(v.float(), results[True][1][k].float(), atol=1e-5), k


def test_teacher_cache_refuses_augmented_data(digits_teacher: Path, tmp_path: Path) -> None:
    model = digits_student(digits_teacher, [BLKD()], cache_teacher=True)
    with pytest.raises(ConfigError, match="augments its training images"):
        quiet_trainer(tmp_path, max_steps=1).fit(model, DigitsDataModule(batch_size=32, augment=True))


def test_regression_distils_with_feature_losses_and_refuses_logit_losses(
    value_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    L.seed_everything(0)
    dm = DigitValue(batch_size=64, augment=False)
    kw = dict(
        net="tinynet",
        in_channels=1,
        image_size=8,
        mean=dm.mean,
        std=dm.std,
        label_range=dm.label_range,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    with pytest.raises(ConfigError, match="BLKD compares class outputs and cannot distil a regression"):
        DistillModule(teacher=str(value_teacher), kd_losses=[BLKD()], **kw)
    model = DistillModule(teacher=str(value_teacher), kd_losses=[FitNet(weight=1.0), AT(weight=10.0), RKD()], **kw)
    assert model.task == "regression" and model.monitor == "val/mae"
    trainer = quiet_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, dm)
    parts = {"train/kd/fitnet", "train/kd/at", "train/kd/rkd", "train/kd/rkd/dist", "train/kd/rkd/angle"}
    assert {f"{k}_epoch" for k in parts} <= set(trainer.callback_metrics)
    res = trainer.test(model, dm, verbose=False)[0]
    assert res["test/mae"] < 0.75 * 2.5  # in digit units; the best constant predictor is ~2.5
    trainer.save_checkpoint(tmp_path / "student.ckpt")  # a distilled regressor can teach in turn
    # built in Python, its hyper-parameters hold the loss objects: reading it back needs the user's trust
    with pytest.raises(CheckpointError, match="holds more than tensors and plain values"):
        FrozenTeacher.from_checkpoint(tmp_path / "student.ckpt")
    monkeypatch.setenv(TRUST_ENV, str(tmp_path / "student.ckpt"))  # trust names the file
    again = FrozenTeacher.from_checkpoint(tmp_path / "student.ckpt")
    assert again.task == "regression" and again.num_classes is None


def test_mismatched_teacher_is_named(digits_teacher: Path) -> None:
    dm = DigitsDataModule()
    with pytest.raises(
        ConfigError,
        match=r"teacher tinynet \(10 classes.*num_classes=10 but the student 'tinynet' "
        r"has num_classes=5",
    ):
        DistillModule(
            teacher=str(digits_teacher),
            net="tinynet",
            num_classes=5,
            in_channels=1,
            mean=dm.mean,
            std=dm.std,
            image_size=8,
        )
    with pytest.raises(ConfigError, match="in_channels=1 but the student 'tinynet' has in_channels=3"):
        DistillModule(teacher=str(digits_teacher), net="tinynet", num_classes=10, in_channels=3, image_size=8)


def test_crd_banks_are_checkpointed_and_reload(digits_teacher: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = digits_student(digits_teacher, [CRD(nce_k=64)])
    dm = DigitsDataModule(batch_size=32, augment=False)
    path = fit_and_save(model, dm, tmp_path / "crd.ckpt", max_steps=3, limit_val_batches=0)
    n = len(dm.train_dataset.dataset)
    assert model.kd_terms[0].memory_s.shape == (n, 128)
    loaded = DistillModule.load_from_checkpoint(path, weights_only=False)
    assert torch.equal(loaded.kd_terms[0].memory_s, model.kd_terms[0].memory_s)
    assert torch.equal(loaded.kd_terms[0].z_s, model.kd_terms[0].z_s)


def test_distill_resume_is_bit_exact(
    kdl, kdl_callbacks, digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM mid-epoch, resume: same weights, connectors, CRD banks and optimiser state as one run."""
    from kd_lightning.callbacks import EXIT_SIGTERM
    from tests.helpers import RECIPES, RESUME_ARGS, STEPS_PER_EPOCH, Interrupt, assert_same, final_state

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    extra = kdl_callbacks
    args = [
        "fit",
        "--config",
        str(RECIPES / "digits" / "blkd.yaml"),
        *RESUME_ARGS,
        "--model.init_args.teacher",
        str(digits_teacher),
        "--model.init_args.kd_losses",
        "[{class_path: BLKD}, {class_path: FitNet}, {class_path: CRD, init_args: {nce_k: 32}}]",
    ]
    assert kdl(*args, "--trainer.default_root_dir", "ref") == 0
    extra[:] = [Interrupt("train", 1, 2, "signal")]
    assert kdl(*args, "--trainer.default_root_dir", "run") == EXIT_SIGTERM
    extra[:] = []
    assert kdl(*args, "--trainer.default_root_dir", "run", "--ckpt_path", "last") == 0
    resumed, reference = (final_state(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("run", "ref"))
    assert int(reference["global_step"]) == 3 * STEPS_PER_EPOCH
    assert "model.kd_terms.2._extra_state.fields.memory_s" in resumed  # CRD's banks are in the checkpoint
    assert_same(resumed, reference)
