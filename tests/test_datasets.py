"""Real-format loaders on small fake files: one ``kdl fit`` step each, values, and clear errors."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CUB200DataModule,
    ImageFolderDataModule,
    RotatedDataModule,
    SteeringAngleDataModule,
    TinyImageNetDataModule,
    UTKFaceDataModule,
)
from kd_lightning.data.image_files import ImageFileDataset
from kd_lightning.data.rotated import RotatedDataset, inscribed_side
from kd_lightning.data.steering import angle_intervals
from kd_lightning.errors import DataNotFoundError
from tests.fake_datasets import (
    corrupt,
    write_cifar,
    write_cub,
    write_image_folder,
    write_rc49,
    write_steering,
    write_tiny_imagenet,
    write_utkface,
)
from tests.helpers import RECIPES, SIZE32

HAS_H5PY = importlib.util.find_spec("h5py") is not None
FAST = ("--trainer.fast_dev_run", "1", "--model.init_args.net", "tinynet", "--data.init_args.batch_size", "4")

# recipe, fake-data writer, extra command-line overrides
FIT_CASES = {
    "cifar100_teacher": ("cifar100/teacher.yaml", lambda r: write_cifar(r, hundred=True), ()),
    "cifar100_student": ("cifar100/student.yaml", lambda r: write_cifar(r, hundred=True), ()),
    "cifar10": ("cifar100/teacher.yaml", write_cifar, ("--data", "CIFAR10DataModule")),
    "tiny_imagenet": ("tiny_imagenet/teacher.yaml", write_tiny_imagenet, SIZE32),
    "cub200": ("cub200/teacher.yaml", write_cub, (*SIZE32, "--data.init_args.bbox_crop", "true")),
    "image_folder": ("image_folder/teacher.yaml", write_image_folder, SIZE32),
    "utkface": ("utkface/teacher.yaml", write_utkface, SIZE32),
    "steering_angle": ("steering_angle/teacher.yaml", lambda r: write_steering(r)[0],
                       ("--data.init_args.min_per_interval", "9")),
}  # fmt: skip


@pytest.mark.parametrize("case", ["cifar10", "cub200"])  # variants of a recipe; the recipes run in test_recipes.py
def test_fit_one_step_on_fake_files(case: str, kdl, tmp_path: Path) -> None:
    recipe, writer, extra = FIT_CASES[case]
    root = writer(tmp_path / "data")
    assert kdl("fit", "--config", str(RECIPES / recipe), "--data.init_args.root", str(root), *FAST, *extra) == 0


@pytest.mark.parametrize("case", ["cifar100_teacher", "tiny_imagenet", "cub200", "utkface", "steering_angle"])
def test_missing_root_is_a_clear_error(case: str, kdl, tmp_path: Path, capsys) -> None:
    recipe, _, extra = FIT_CASES[case]
    missing = tmp_path / "nowhere"
    assert kdl("fit", "--config", str(RECIPES / recipe), "--data.init_args.root", str(missing), *FAST, *extra) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_missing_image_folder_root_is_a_clear_error(kdl, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert (
        kdl("fit", "--config", str(RECIPES / "image_folder/teacher.yaml"), "--data.init_args.root", str(missing)) == 2
    )
    assert str(missing / "train") in capsys.readouterr().err


def test_corrupt_image_fails_fit_clearly(kdl, tmp_path: Path, capsys) -> None:
    root = write_cub(tmp_path / "data", per_class=2)
    bad = corrupt(next((root / "CUB_200_2011" / "images").rglob("*.jpg")), "truncate")
    args = (
        "--data.init_args.root",
        str(root),
        "--data.init_args.image_size",
        "32",
        "--data.init_args.val_fraction",
        "0",
    )
    assert kdl("fit", "--config", str(RECIPES / "cub200/teacher.yaml"), *args, *FAST) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "corrupt or truncated" in err


@pytest.mark.parametrize("how", ["truncate", "empty", "garbage"])
def test_damaged_image_files_never_load(how: str, tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", num_classes=2, n_train=2, n_test=1)
    good = root / "train" / "class_0" / "0.png"
    bad = corrupt(root / "train" / "class_1" / "0.png", how)
    if how == "empty":  # caught by the cheap stat check when the dataset is built
        with pytest.raises(DataNotFoundError, match=str(bad)):
            ImageFileDataset([good, bad], [0, 1])
        return
    ds = ImageFileDataset([good, bad], [0, 1], size=16)
    assert ds[0][0].size == (16, 16)
    with pytest.raises(DataNotFoundError, match="corrupt or truncated") as e:
        ds[1]
    assert str(bad) in str(e.value)
    with pytest.raises(DataNotFoundError, match=str(bad)):
        ImageFileDataset([good, bad], [0, 1], verify=True)  # verify=True fails up front


# ----------------------------------------------------------------------------------------------- CIFAR
def test_cifar_decodes_pixels_and_labels(tmp_path: Path) -> None:
    root = write_cifar(tmp_path)
    with open(root / "cifar-10-batches-py" / "data_batch_3", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    for r in (root, root / "cifar-10-batches-py"):  # the parent or the extracted folder itself
        train = CIFAR10DataModule(root=str(r)).build_dataset("train")
        assert len(train) == 100 and len(CIFAR10DataModule(root=str(r)).build_dataset("test")) == 20
        image, label = train[40]  # first image of data_batch_3
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert torch.equal(image.flatten(), torch.from_numpy(raw[b"data"][0]))
        assert int(label) == raw[b"labels"][0]
    root100 = write_cifar(tmp_path / "c100", hundred=True)
    ds = CIFAR100DataModule(root=str(root100)).build_dataset("train")
    assert len(ds) == 100 and sorted(set(ds.labels.tolist())) == list(range(100))


def test_cifar_malformed_files(tmp_path: Path) -> None:
    root = write_cifar(tmp_path)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DataNotFoundError, match="N x 3072") as e:
        CIFAR10DataModule(root=str(root)).build_dataset("train")
    assert str(batch) in str(e.value)
    batch.write_bytes(b"\x80garbage")
    with pytest.raises(DataNotFoundError, match="not a CIFAR python batch"):
        CIFAR10DataModule(root=str(root)).build_dataset("train")
    write_cifar(tmp_path)  # restore, then lose one batch
    (root / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_5"):
        CIFAR10DataModule(root=str(root)).build_dataset("train")


# --------------------------------------------------------------------------------- Tiny-ImageNet, CUB
def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    root = write_tiny_imagenet(tmp_path, num_classes=3, n_train=2, n_val=2)
    dm = TinyImageNetDataModule(root=str(root))
    assert dm.num_classes == 3  # read from wnids.txt
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert len(train) == 6 and len(test) == 6
    assert test.targets.tolist() == [0, 0, 1, 1, 2, 2]  # from val_annotations.txt
    image, _ = test[2]
    assert image.size == (64, 64)
    ann = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataNotFoundError, match=r"wnids.txt"):
        dm.build_dataset("test")


def test_cub_split_labels_and_bbox_crop(tmp_path: Path) -> None:
    root = write_cub(tmp_path, num_classes=4, per_class=5, size=48)
    dm = CUB200DataModule(root=str(root), image_size=48)
    assert dm.num_classes == 4  # read from classes.txt
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert len(train) == 16 and len(test) == 4  # train_test_split.txt: the last image per class is test
    assert test.targets.tolist() == [0, 1, 2, 3]  # 1-based class ids -> 0-based labels
    assert CUB200DataModule(root=str(root / "CUB_200_2011")).build_dataset("test").targets.tolist() == [0, 1, 2, 3]
    cropped = CUB200DataModule(root=str(root), bbox_crop=True, image_size=48).build_dataset("test")
    img = np.asarray(cropped[1][0], dtype=np.float32)  # class 1: bright square in cell (row 0, col 1) of the box
    step = 48 // 4
    assert img[2 : step - 2, step + 2 : 2 * step - 2].mean() > 180
    assert img[2 * step :, 2 * step :].mean() < 90
    labels = root / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataNotFoundError, match=r"image_class_labels.txt"):
        dm.build_dataset("train")


# ------------------------------------------------------------------------------------------ ImageFolder
def test_image_folder_classes_and_errors(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, num_classes=3, n_train=2, n_test=1, test_dir="val")
    dm = ImageFolderDataModule(root=str(root), image_size=24)
    assert dm.classes == ["class_0", "class_1", "class_2"] and dm.num_classes == 3
    assert len(dm.build_dataset("train")) == 6 and len(dm.build_dataset("test")) == 3  # test_dir found: val/
    sub = ImageFolderDataModule(root=str(root), classes=["class_2", "class_0"], image_size=24)
    assert sub.num_classes == 2 and sub.build_dataset("test").targets.tolist() == [0, 1]  # class_2 -> 0
    for f in (root / "train" / "class_1").iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError, match=r"class_1.*holds no images"):
        dm.build_dataset("train")


# --------------------------------------------------------------------------------- regression loaders
def test_utkface_ages_split_and_normalisation(tmp_path: Path) -> None:
    root = write_utkface(tmp_path, ages=(1, 10, 30, 60, 75), per_age=5)
    dm = UTKFaceDataModule(root=str(root))
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert len(train) + len(test) == 20  # age 75 dropped, the README ignored
    assert sorted(test.targets.tolist()) == [1.0, 10.0, 30.0, 60.0]  # 20% of every age (1 of 5)
    norm = dm.target_transform()
    assert norm(30.0).item() == pytest.approx((30 - 1) / 59)
    assert dm.label_range == (1.0, 60.0)
    img, _ = train[0]
    assert img.size == (64, 64)


def test_steering_angle_file_and_interval_split(tmp_path: Path) -> None:
    root, angles = write_steering(tmp_path, n=60, dated=True)
    dm = SteeringAngleDataModule(root=str(root), min_per_interval=10, max_angle=85.0)
    kept = angles[angles <= 85.0]
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert sorted(train.targets.tolist() + test.targets.tolist()) == pytest.approx(sorted(kept.tolist()), abs=1e-4)
    groups = angle_intervals(torch.tensor(kept), 10)
    assert len(test) == sum(round(0.2 * int((groups == g).sum())) for g in groups.unique())
    assert not dm.hflip and dm.label_range == (-88.13, 85.0)
    assert angle_intervals(torch.tensor([3.0, 1.0, 1.0, 2.0, 2.0, 5.0]), 2).tolist() == [2, 0, 0, 1, 1, 2]
    assert angle_intervals(torch.tensor([3.0, 1.0, 1.0, 2.0, 2.0]), 2).tolist() == [1, 0, 0, 1, 1]  # short tail merges
    (root / "data.txt").write_text("0.jpg not-a-number\n")
    with pytest.raises(DataNotFoundError, match=r"data.txt:1"):
        dm.build_dataset("train")


@pytest.mark.skipif(not HAS_H5PY, reason="h5py not installed")
def test_rc49_fit(kdl, tmp_path: Path) -> None:
    root = write_rc49(tmp_path / "rc49")
    args = ("--data", "RC49DataModule", "--data.init_args.root", str(root), *FAST)
    assert kdl("fit", "--config", str(RECIPES / "utkface/teacher.yaml"), *args) == 0


@pytest.mark.skipif(HAS_H5PY, reason="h5py is installed")
def test_rc49_without_h5py_says_so(kdl, tmp_path: Path, capsys) -> None:
    args = ("--data", "RC49DataModule", "--data.init_args.root", str(tmp_path), *FAST)
    assert kdl("fit", "--config", str(RECIPES / "utkface/teacher.yaml"), *args) == 2
    assert "pip install h5py" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- Rotated
def test_rotation_is_exact_and_counter_clockwise() -> None:
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    base = [(image, 0)]
    ds = RotatedDataset(base, torch.tensor([90.0, 0.0]), size=8, crop=8)  # type: ignore[arg-type]
    assert torch.equal(ds[0][0], torch.rot90(image, 1, dims=(-2, -1)))  # +90 degrees = counter-clockwise
    assert torch.equal(ds[1][0], image) and ds[1][1].item() == 0.0
    assert inscribed_side(64, 45.0) == 45 and inscribed_side(64, 0.0) == 64


def test_rotated_datamodule_splits_by_source_image(tmp_path: Path) -> None:
    root = write_cifar(tmp_path)
    dm = RotatedDataModule(datamodule=CIFAR10DataModule(root=str(root)), min_angle=-30.0, max_angle=60.0,
                           rotations_per_image=3, val_fraction=0.2, batch_size=8)  # fmt: skip
    assert dm.task == "regression" and dm.label_range == (-30.0, 60.0) and dm.in_channels == 3 and not dm.hflip
    dm.setup("fit")
    n_src = 100
    train_src = {i % n_src for i in dm.train_dataset.indices}
    val_src = {i % n_src for i in dm.val_dataset.indices}
    assert not train_src & val_src and len(val_src) == 20 and len(dm.train_dataset) == 240
    batch = next(iter(dm.train_dataloader()))
    raw = dm.train_dataset.dataset.base.angles[batch["index"]]  # the angle each image was rotated by
    assert torch.allclose(batch["label"], (raw + 30.0) / 90.0)
    assert (raw >= -30).all() and (raw <= 60).all()


def test_check_data_reports_the_splits_or_where_the_data_should_be(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kdl check-data --config RECIPE`` builds only the recipe's DataModule: split sizes when the data is there,
    the DataModule's own message and a pointer to docs/datasets.md when not (exit status 2)."""
    from kd_lightning.check_data import main as check_data
    from kd_lightning.commands import main as kdl

    assert kdl(["check-data", "--config", str(RECIPES / "digits/teacher.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok: DigitsDataModule: train 1,298, val 144, test 355; 10 classes")
    missing = str(tmp_path / "nowhere")
    assert check_data(["--config", str(RECIPES / "aikd_cub.yaml"), "--data.init_args.root", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdl check-data: error: CUB-200-2011 not found") and missing in err
    assert "docs/datasets.md" in err
