"""Every distillation recipe runs (fast_dev_run) on fake files of its dataset with a tiny teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.methods import ImageClassifier, ImageRegressor, SSKDTeacherHead
from tests.conftest import RECIPES, make_fake_mnist
from tests.fake_datasets import write_cifar, write_steering, write_utkface
from tests.test_cli import ALL_RECIPES, NEEDS_TEACHER, recipe_data_class, recipe_model_class
from tests.test_kd_stages import STAGE_RECIPES

# cGAN-KD students (AugmentedDataModule over a sample store) run in tests/test_cgankd.py
DISTILL_RECIPES = [
    r for r in ALL_RECIPES if recipe_model_class(r) in NEEDS_TEACHER and recipe_data_class(r) != "AugmentedDataModule"
]
#: dataset class -> (fake-data writer, classes (None: regression), channels, image size, mean, std)
DATA = {
    "FashionMNISTDataModule": (lambda root: make_fake_mnist(root), 10, 1, 32, (0.2860,), (0.3530,)),
    "CIFAR100DataModule": (lambda root: write_cifar(root, hundred=True), 100, 3, 32, (0.5,) * 3, (0.25,) * 3),
    "DigitsDataModule": (None, 10, 1, 8, (0.3,), (0.38,)),  # scikit-learn's digits: always on disk
    "UTKFaceDataModule": (lambda root: write_utkface(root), None, 3, 64, (0.5,) * 3, (0.5,) * 3),
    "SteeringAngleDataModule": (lambda root: write_steering(root)[0], None, 3, 64, (0.5,) * 3, (0.5,) * 3),
}
#: options the fake files need (60 fake frames: smaller angle intervals than the real set's 40 per interval)
DATA_ARGS = {"SteeringAngleDataModule": ["--data.init_args.min_per_interval", "9"]}


def write_teacher(
    path: Path, num_classes: int | None, in_channels: int, image_size: int, mean: tuple, std: tuple
) -> Path:
    """A random tinynet classifier (regressor when ``num_classes`` is None) saved with the keys a kdl run writes."""
    cls = ImageClassifier if num_classes else ImageRegressor
    extra = {"num_classes": num_classes} if num_classes else {"label_range": (0.0, 1.0)}
    model = cls(net="tinynet", in_channels=in_channels, image_size=image_size, mean=mean, std=std, **extra)
    hp = {**dict(model.hparams), "_class_path": f"kd_lightning.methods.{cls.__name__}"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp}, path)
    return path


def write_sskd_teacher_head(
    path: Path, teacher: Path, num_classes: int, in_channels: int, image_size: int, mean: tuple, std: tuple
) -> Path:
    """An (untrained) SSKDTeacherHead of ``teacher`` saved with the keys a kdl run writes."""
    model = SSKDTeacherHead(
        teacher=str(teacher),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_every_distill_recipe_is_covered() -> None:
    assert len(DISTILL_RECIPES) >= 8
    assert {recipe_data_class(r) for r in DISTILL_RECIPES} <= set(DATA)


@pytest.mark.parametrize("recipe", DISTILL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_distill_recipe_fast_dev_run(recipe: Path, kdl, tmp_path: Path) -> None:  # noqa: ANN001
    if recipe in STAGE_RECIPES:
        pytest.skip("run with a teacher of the student's layout, or as a chain, in tests/test_kd_stages.py")
    writer, classes, channels, size, mean, std = DATA[recipe_data_class(recipe)]
    data = ["--data.init_args.root", str(writer(tmp_path / "data"))] if writer else []
    data += DATA_ARGS.get(recipe_data_class(recipe), [])
    teacher = write_teacher(tmp_path / "teacher.ckpt", classes, channels, size, mean, std)
    for term in yaml.safe_load(recipe.read_text())["model"]["init_args"].get("kd_losses") or []:
        head = (term.get("init_args") or {}).get("teacher_head")
        if head:  # SSKD with the reference schedule: stage 1's SS module, at the recipe's (relative) path
            write_sskd_teacher_head(tmp_path / head, teacher, classes, channels, size, mean, std)
    assert (
        kdl(
            "fit",
            "--config",
            str(recipe),
            "--trainer.fast_dev_run",
            "1",
            "--model.init_args.teacher",
            str(teacher),
            *data,
        )
        == 0
    )


def test_missing_teacher_is_one_clear_message(kdl, fake_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    recipe = RECIPES / "fashion_mnist" / "blkd.yaml"
    assert (
        kdl(
            "fit",
            "--config",
            str(recipe),
            "--data.init_args.root",
            str(fake_mnist),
            "--model.init_args.teacher",
            "/no/such/teacher.ckpt",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "'/no/such/teacher.ckpt' does not exist" in err and "Traceback" not in err
