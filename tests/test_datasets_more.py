"""Stanford Dogs, MIT67, FGVC-Aircraft, SVHN, Synthetic Digits and ImageNet-100: values decoded from fake files
in each dataset's own format, clear errors for missing / corrupt / truncated files, and a fast_dev_run of every
recipe that reads them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kd_lightning.data import (
    FGVCAircraftDataModule,
    ImageNet100DataModule,
    MIT67DataModule,
    StanfordDogsDataModule,
    SVHNDataModule,
    SynDigitsDataModule,
)
from kd_lightning.data.fine_grained import FineGrainedDataModule
from kd_lightning.data.imagenet100 import read_class_list
from kd_lightning.errors import ConfigError, DataNotFoundError
from tests.fake_datasets import corrupt
from tests.fake_datasets_more import (
    FGVC_VARIANTS,
    cell,
    save_mat,
    truncate,
    write_fgvc_aircraft,
    write_imagenet,
    write_mit67,
    write_stanford_dogs,
    write_svhn,
    write_syn_digits,
    write_syn_digits_torch,
)
from tests.helpers import QUIET_TRAINER, RECIPES, SIZE32, write_teacher

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
QUIET = tuple(QUIET_TRAINER)
FAST = ("--trainer.fast_dev_run", "1", "--data.init_args.batch_size", "4", *QUIET)


# ------------------------------------------------------------------------------------------------ SVHN
def test_svhn_decodes_pixels_and_maps_label_10_to_0(tmp_path: Path) -> None:
    import scipy.io

    root = write_svhn(tmp_path, n_train=30, n_test=20, n_extra=10)
    raw = scipy.io.loadmat(root / "train_32x32.mat")
    ds = SVHNDataModule(root=str(root)).build_dataset("train")
    assert len(ds) == 30 and ds.images.shape == (30, 3, 32, 32) and ds.images.dtype == torch.uint8
    for i in (0, 9, 17):  # image i is X[:, :, :, i] (H x W x C), channels first
        assert torch.equal(ds.images[i], torch.from_numpy(raw["X"][:, :, :, i].transpose(2, 0, 1).copy()))
    stored = raw["y"].ravel().tolist()
    assert stored[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert ds.labels[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # SVHN's 10 is the digit 0
    img = ds.images[9].permute(1, 2, 0).numpy().astype(np.float32)  # digit 0: the square in cell (0, 0)
    assert img[:8, :8].mean() > 200 and img[8:16, 8:16].mean() < 80
    assert len(SVHNDataModule(root=str(root), extra=True).build_dataset("train")) == 40
    assert len(SVHNDataModule(root=str(root)).build_dataset("test")) == 20


def test_syn_digits_reads_ganins_mat_release(tmp_path: Path) -> None:
    root = write_syn_digits(tmp_path, n_train=30, n_test=10)
    dm = SynDigitsDataModule(root=str(root))
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert len(train) == 30 and len(test) == 10
    assert test.labels.tolist() == list(range(10))  # stored 0..9, unchanged
    assert dm.num_classes == 10 and not dm.hflip and not dm.extra
    truncate(root / "synth_train_32x32.mat", 0.5)
    with pytest.raises(DataNotFoundError, match=r"synth_train_32x32.mat' is corrupt or truncated"):
        dm.build_dataset("train")


@pytest.mark.parametrize("nested", [False, True])
def test_syn_digits_reads_mekds_torch_repack(nested: bool, tmp_path: Path) -> None:
    root = write_syn_digits_torch(tmp_path, n_train=30, n_test=10, nested=nested)
    folder = root / "SyntheticDigits" / "processed" if nested else root
    raw_images, raw_labels = torch.load(folder / "synth_test.pt")
    test = SynDigitsDataModule(root=str(root)).build_dataset("test")
    assert test.images.shape == (10, 3, 32, 32) and test.labels.tolist() == raw_labels.tolist()
    assert torch.equal(test.images[4], raw_images[4].permute(2, 0, 1))  # H x W x C -> C x H x W
    assert len(SynDigitsDataModule(root=str(root)).build_dataset("train")) == 30
    truncate(folder / "synth_test.pt", 0.5)
    with pytest.raises(DataNotFoundError, match=r"synth_test.pt' is corrupt or truncated"):
        SynDigitsDataModule(root=str(root)).build_dataset("test")
    torch.save({"data": raw_images}, folder / "synth_test.pt")
    with pytest.raises(DataNotFoundError, match=r"holds dict; expected a torch.save'd pair"):
        SynDigitsDataModule(root=str(root)).build_dataset("test")
    (folder / "synth_test.pt").unlink()
    with pytest.raises(
        DataNotFoundError, match=r"expected synth_test_32x32.mat .Ganin's .mat release. or synth_test.pt"
    ):
        SynDigitsDataModule(root=str(root)).build_dataset("test")


def _svhn_damage(root: Path, how: str) -> Path:
    path = root / "test_32x32.mat"
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        truncate(path, 0.6)
    elif how == "garbage":
        path.write_bytes(b"not a mat file " * 20)
    elif how == "no_y":
        x = np.zeros((32, 32, 3, 2), np.uint8)
        save_mat(path, X=x)
    elif how == "bad_shape":
        save_mat(path, X=np.zeros((28, 28, 2), np.uint8), y=np.ones((2, 1), np.uint8))
    elif how == "bad_label":
        save_mat(path, X=np.zeros((32, 32, 3, 2), np.uint8), y=np.array([[3], [11]], np.uint8))
    elif how == "count":
        save_mat(path, X=np.zeros((32, 32, 3, 2), np.uint8), y=np.array([[3]], np.uint8))
    return path


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("truncated", "corrupt or truncated"),
        ("garbage", "corrupt or truncated"),
        ("no_y", "has no variable 'y'"),
        ("bad_shape", "expected 32 x 32 x 3 x N uint8"),
        ("bad_label", r"labels span \[3, 11\]"),
        ("count", "1 labels .y. for 2 images"),
    ],
)
def test_svhn_damaged_files_are_clear_errors(how: str, message: str, tmp_path: Path) -> None:
    root = write_svhn(tmp_path, n_train=4, n_test=4, n_extra=1)
    bad = _svhn_damage(root, how)
    with pytest.raises(DataNotFoundError, match=message) as e:
        SVHNDataModule(root=str(root)).build_dataset("test")
    assert str(bad) in str(e.value)


def test_mat_v73_is_named(tmp_path: Path) -> None:
    path = tmp_path / "test_32x32.mat"  # MATLAB's save -v7.3 writes HDF5 behind a 512-byte header with version 0x0200
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM"
    path.write_bytes(header.ljust(512, b"\x00") + b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(DataNotFoundError, match=r"is a MATLAB v7.3 .HDF5. file") as e:
        SVHNDataModule(root=str(tmp_path)).build_dataset("test")
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------ Stanford Dogs
@pytest.mark.parametrize("flat", [False, True])
def test_stanford_dogs_official_split_and_labels(flat: bool, tmp_path: Path) -> None:
    import scipy.io

    root = write_stanford_dogs(tmp_path, num_classes=4, n_train=3, n_test=2, size=32, flat_lists=flat)
    dm = StanfordDogsDataModule(root=str(root), image_size=24)
    assert dm.num_classes == 4  # the breed folders of Images/
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert len(train) == 12 and len(test) == 8
    lists = root if flat else root / "lists"
    raw = scipy.io.loadmat(lists / "test_list.mat")
    files = [str(f[0][0]) for f in raw["file_list"]]
    assert [Path(p).relative_to(root / "Images").as_posix() for p in test.paths] == files  # list order kept
    assert test.targets.tolist() == [int(y) - 1 for y in raw["labels"].ravel()]  # 1-based -> 0-based
    breeds = sorted(p.name for p in (root / "Images").iterdir())
    for path, y in zip(test.paths, test.targets.tolist()):
        assert Path(path).parent.name == breeds[y]
    image, _ = test[0]
    assert image.size == (24, 24)


def test_stanford_dogs_errors(tmp_path: Path) -> None:
    root = write_stanford_dogs(tmp_path, num_classes=3, n_train=2, n_test=1, size=24)
    dm = StanfordDogsDataModule(root=str(root), image_size=16)
    lst = root / "lists" / "train_list.mat"
    files = ["n02085620-Breed_0/n02085620_1000.jpg", "n02085720-Breed_1/n02085720_1000.jpg"]
    save_mat(lst, file_list=cell(files), labels=np.array([[1.0], [1.0]]))  # 2nd file is not breed 1
    with pytest.raises(DataNotFoundError, match=r"n02085720_1000.jpg' has label 1") as e:
        dm.build_dataset("train")
    assert str(lst) in str(e.value)
    truncate(lst, 0.7)
    with pytest.raises(DataNotFoundError, match="corrupt or truncated"):
        dm.build_dataset("train")
    lst.unlink()
    with pytest.raises(DataNotFoundError, match=r"lists/train_list.mat"):
        dm.build_dataset("train")
    bad = corrupt(next((root / "Images").rglob("*_1002.jpg")), "truncate")  # a test image
    ds = dm.build_dataset("test")
    with pytest.raises(DataNotFoundError, match="corrupt or truncated") as e:
        [ds[i] for i in range(len(ds))]
    assert str(bad) in str(e.value)
    with pytest.raises(DataNotFoundError, match=str(bad)):
        StanfordDogsDataModule(root=str(root), image_size=16, verify=True).build_dataset("test")
    (root / "Images" / "n02085620-Breed_0" / "n02085620_1002.jpg").unlink()
    with pytest.raises(DataNotFoundError, match=r"n02085620_1002.jpg' does not exist"):
        dm.build_dataset("test")


# ------------------------------------------------------------------------------------------------ MIT67
def test_mit67_lists_labels_and_errors(tmp_path: Path) -> None:
    root = write_mit67(tmp_path, num_classes=3, n_train=3, n_test=2, size=32)
    dm = MIT67DataModule(root=str(root), image_size=20)
    assert dm.num_classes == 3
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert len(train) == 9 and len(test) == 6  # unlisted.jpg is in no split
    assert test.targets.tolist() == [0, 0, 1, 1, 2, 2]  # sorted categories: airport_inside, bakery, winecellar
    image, _ = train[0]  # a greyscale photo, served as RGB
    assert image.mode == "RGB" and image.size == (20, 20)
    (root / "TestImages.txt").write_text("bakery/bakery_0003.jpg\nlibrary/library_0001.jpg\n")
    with pytest.raises(DataNotFoundError, match=r"TestImages.txt:2: 'library/library_0001.jpg'"):
        dm.build_dataset("test")
    (root / "TestImages.txt").write_text("")
    with pytest.raises(DataNotFoundError, match=r"TestImages.txt' is empty"):
        dm.build_dataset("test")
    (root / "TrainImages.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"TrainImages.txt' does not exist"):
        dm.build_dataset("train")


@pytest.mark.parametrize("how", ["truncate", "garbage", "empty"])
def test_mit67_damaged_image(how: str, tmp_path: Path) -> None:
    root = write_mit67(tmp_path, num_classes=2, n_train=2, n_test=1, size=24)
    bad = corrupt(root / "Images" / "bakery" / "bakery_0001.jpg", how)
    dm = MIT67DataModule(root=str(root), image_size=16, verify=True)
    with pytest.raises(DataNotFoundError, match=r"empty|corrupt or truncated") as e:
        dm.build_dataset("train")
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------------------------------- FGVC-Aircraft
def test_fgvc_aircraft_variants_and_splits(tmp_path: Path) -> None:
    root = write_fgvc_aircraft(tmp_path, per_split=2, size=32)
    data = root / "fgvc-aircraft-2013b" / "data"
    for r in (root, root / "fgvc-aircraft-2013b", data):  # any of the three folders
        dm = FGVCAircraftDataModule(root=str(r), image_size=16)
        assert dm.num_classes == 4
        train, test = dm.build_dataset("train"), dm.build_dataset("test")
        assert len(train) == 16 and len(test) == 8  # trainval = train + val
    assert test.targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # variants.txt order, names with spaces and '/'
    first = (data / "images_variant_test.txt").read_text().splitlines()[0].split(" ", 1)[0]
    assert Path(test.paths[0]) == data / "images" / f"{first}.jpg"
    assert len(FGVCAircraftDataModule(root=str(root), train_split="train").build_dataset("train")) == 8
    with pytest.raises(ConfigError, match="train_split='val'"):
        FGVCAircraftDataModule(root=str(root), train_split="val")  # type: ignore[arg-type]
    (data / "images_variant_test.txt").write_text(f"1000007 {FGVC_VARIANTS[2]}\n1000014 Boeing 999\n")
    with pytest.raises(DataNotFoundError, match=r"images_variant_test.txt:2: '1000014 Boeing 999'"):
        dm.build_dataset("test")
    truncate(data / "images" / "1000007.jpg", 0.4)
    ds = FGVCAircraftDataModule(root=str(root), image_size=16).build_dataset("train")
    with pytest.raises(DataNotFoundError, match=r"1000007.jpg' is corrupt or truncated"):
        ds[0]
    (data / "variants.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"no variants.txt"):
        FGVCAircraftDataModule(root=str(root)).build_dataset("train")


# ------------------------------------------------------------------------------------------ ImageNet-100
def test_shipped_class_list_is_cmcs_hundred_wnids() -> None:
    wnids = read_class_list("cmc")
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"] and wnids[-1] == "n02090622"  # CMC's file order
    assert "n02085620" in wnids  # Chihuahua


def test_imagenet100_filters_imagenet_by_the_class_list(tmp_path: Path) -> None:
    cmc = read_class_list("cmc")
    root = write_imagenet(tmp_path / "imagenet", [*cmc, "n09999999", "n00000001"], n_train=1, n_val=1, size=8)
    dm = ImageNet100DataModule(root=str(root), image_size=8)
    assert dm.num_classes == 100 and dm.classes == sorted(cmc)  # the two other classes are left out
    train, test = dm.build_dataset("train"), dm.build_dataset("test")
    assert len(train) == 100 and len(test) == 100
    assert [Path(p).parent.name for p in test.paths] == sorted(cmc)
    assert test.targets.tolist() == list(range(100))
    assert ImageNet100DataModule(root=str(tmp_path / "nowhere")).num_classes == 100  # reported at setup


def test_imagenet100_custom_list_and_errors(tmp_path: Path) -> None:
    wnids = ["n01440764", "n01443537", "n01484850"]
    root = write_imagenet(tmp_path / "imagenet", wnids, n_train=2, n_val=1, size=8)
    listing = tmp_path / "classes.txt"
    listing.write_text("# three classes\nn01484850\nn01440764  # tench\n")
    dm = ImageNet100DataModule(root=str(root), class_list=str(listing), image_size=8)
    assert dm.classes == ["n01440764", "n01484850"] and dm.num_classes == 2
    assert dm.build_dataset("test").targets.tolist() == [0, 1]
    listing.write_text("n01440764\ngoldfish\n")
    with pytest.raises(ConfigError, match="line 2: 'goldfish' is not a WordNet id"):
        ImageNet100DataModule(root=str(root), class_list=str(listing))
    with pytest.raises(ConfigError, match="class_list='imagenet1k'"):
        ImageNet100DataModule(root=str(root), class_list="imagenet1k")
    with pytest.raises(DataNotFoundError, match="have no folder"):
        ImageNet100DataModule(root=str(root))  # the CMC classes are not all there
    listing.write_text("n01440764\nn01484850\n")
    bad = truncate(next((root / "val" / "n01440764").iterdir()), 0.3)
    ds = ImageNet100DataModule(root=str(root), class_list=str(listing), image_size=8).build_dataset("test")
    with pytest.raises(DataNotFoundError, match="corrupt or truncated") as e:
        ds[0]
    assert str(bad) in str(e.value)
    shutil.rmtree(root / "val" / "n01484850")
    with pytest.raises(DataNotFoundError, match="class 'n01484850'"):
        ImageNet100DataModule(root=str(root), class_list=str(listing)).build_dataset("test")


def test_imagenet100_holdout_test_split_is_fixed_and_disjoint(tmp_path: Path) -> None:
    wnids = ["n01440764", "n01443537", "n01484850"]
    root = write_imagenet(tmp_path / "imagenet", wnids, n_train=10, n_val=1, size=8)
    shutil.rmtree(root / "val")  # cGAN-KD's protocol needs no val folder
    listing = tmp_path / "classes.txt"
    listing.write_text("\n".join(wnids) + "\n")
    dms = [ImageNet100DataModule(root=str(root), class_list=str(listing), test_split="holdout", holdout_size=7,
                                 image_size=8, seed=s) for s in (0, 1)]  # fmt: skip
    train, test = dms[0].build_dataset("train"), dms[0].build_dataset("test")
    assert len(test) == 7 and len(train) == 23 and not set(train.paths) & set(test.paths)
    assert sorted(train.paths + test.paths) == sorted(str(p) for p in (root / "train").rglob("*.JPEG"))
    for paths, targets in ((train.paths, train.targets), (test.paths, test.targets)):
        assert [wnids.index(Path(p).parent.name) for p in paths] == targets.tolist()
    assert dms[1].build_dataset("test").paths == test.paths  # independent of the run's seed
    with pytest.raises(DataNotFoundError, match=r"holdout_size=30 but .* holds only 30 images"):
        ImageNet100DataModule(
            root=str(root), class_list=str(listing), test_split="holdout", holdout_size=30
        ).build_dataset("test")
    with pytest.raises(ConfigError, match="test_split='train'"):
        ImageNet100DataModule(root=str(root), test_split="train")  # type: ignore[arg-type]


FINE_GRAINED = {
    "stanford_dogs": lambda d: write_stanford_dogs(d, num_classes=4, n_train=4, n_test=1, size=32),
    "mit67": lambda d: write_mit67(d, num_classes=4, n_train=4, n_test=1, size=32),
    "fgvc_aircraft": lambda d: write_fgvc_aircraft(d, per_split=2, size=32),
}
METHODS = ("teacher", "aikd", "cskd", "tfkd", "pskd")
# every shared base and every dataset runs at least once by default; the full product is slow
DEFAULT_PAIRS = {("stanford_dogs", "teacher"), ("stanford_dogs", "aikd"), ("mit67", "cskd"), ("mit67", "tfkd"),
                 ("fgvc_aircraft", "pskd")}  # fmt: skip


def _fine_grained_args(dataset: str, method: str, tmp_path: Path) -> list[str]:
    root = FINE_GRAINED[dataset](tmp_path / dataset)
    args = [
        "--config",
        str(RECIPES / "finegrained" / f"{method}.yaml"),
        "--config",
        str(RECIPES / dataset / f"{method}.yaml"),
    ]
    args += ["--data.init_args.root", str(root)]
    if method in ("aikd", "tfkd"):  # S_sup / the pre-trained teacher (tinynet here: ResNet-18 runs in the others)
        ssup = write_teacher(tmp_path / "ssup.ckpt", 4, 3, None, *IMAGENET_STATS)
        args += ["--model.init_args.net", "tinynet", "--model.init_args.pretrained", str(ssup)]
    return args


@pytest.mark.parametrize(
    ("dataset", "method"),
    [
        pytest.param(d, m, marks=() if (d, m) in DEFAULT_PAIRS else pytest.mark.slow)
        for d in FINE_GRAINED
        for m in METHODS
    ],
)
def test_fine_grained_recipe_fast_dev_run(dataset: str, method: str, kdl, tmp_path: Path) -> None:
    assert kdl("fit", *_fine_grained_args(dataset, method, tmp_path), *SIZE32, *FAST) == 0


def test_fine_grained_overrides_resolve_to_the_shared_settings(tmp_path: Path, monkeypatch) -> None:
    """Every (shared base, dataset override) pair: the dataset's DataModule, run folder and S_sup path, and
    every shared setting (batch 32, 224 px, class pairs for CS-KD, the schedule) kept."""
    import yaml

    from kd_lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)
    first = ["--config", str(RECIPES / "finegrained/teacher.yaml"), "--config", str(RECIPES / "mit67/teacher.yaml")]
    parser = build_cli([*first, "--data.init_args.root", str(tmp_path)], run=False).parser  # parse-only from here
    classes = {
        "stanford_dogs": "StanfordDogsDataModule",
        "mit67": "MIT67DataModule",
        "fgvc_aircraft": "FGVCAircraftDataModule",
    }
    for dataset in FINE_GRAINED:
        for method in METHODS:
            base, override = RECIPES / "finegrained" / f"{method}.yaml", RECIPES / dataset / f"{method}.yaml"
            cfg = parser.parse_args(["--config", str(base), "--config", str(override)]).as_dict()
            shared = yaml.safe_load(base.read_text())
            assert cfg["trainer"]["default_root_dir"] == f"runs/{dataset}/{method}"
            assert cfg["data"]["class_path"] == f"kd_lightning.data.{classes[dataset]}"
            for key, value in shared["data"]["init_args"].items():
                assert cfg["data"]["init_args"][key] == value, (dataset, method, key)
            assert cfg["data"]["init_args"]["root"] == f"data/{dataset}"
            assert cfg["data"]["init_args"]["class_pairs"] == (method == "cskd")
            model = cfg["model"]["init_args"]
            assert cfg["model"]["class_path"].endswith(shared["model"]["class_path"])
            assert model["net"] == "resnet18" and model["optimizer"]["init_args"]["lr"] == 0.1
            assert model["lr_scheduler"]["init_args"]["milestones"] == [150, 225]
            if method in ("aikd", "tfkd"):
                assert model["pretrained"] == f"runs/{dataset}/teacher/checkpoints/best.ckpt"
            assert cfg["trainer"]["max_epochs"] == 300 and cfg["seed_everything"] == 0
            if dataset == "fgvc_aircraft":
                assert cfg["data"]["init_args"]["train_split"] == "trainval"


def test_shared_base_alone_says_what_to_stack() -> None:
    with pytest.raises(ConfigError, match=r"recipes/stanford_dogs/aikd.yaml"):
        FineGrainedDataModule(root="data")


@pytest.mark.parametrize(
    ("recipe", "local"),
    [
        ("mekd/cifar10_resnet56_mobilenetv2.yaml", "CIFAR10DataModule"),
        ("mekd/syn_digits_to_svhn.yaml", "SVHNDataModule"),
    ],
)
def test_mekd_templates(recipe: str, local: str, kdl, capsys) -> None:
    """The templates resolve to MEKD stage 2 with the paper's settings (running them needs a stage-1 generator)."""
    assert kdl("fit", "--config", str(RECIPES / recipe), "--print_config") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    model, data = cfg["model"], cfg["data"]
    assert model["class_path"].endswith("MEKD") and model["init_args"]["net"] == "mobilenetv2"
    assert (model["init_args"]["tau"], model["init_args"]["beta"]) == (5.0, 1.0)
    assert data["class_path"].endswith("QueryPoolDataModule")
    assert data["init_args"]["local"]["class_path"].endswith(local)


# ---------------------------------------------------------------------------------------- missing roots
@pytest.mark.parametrize(
    "make",
    [
        lambda r: SVHNDataModule(root=r),
        lambda r: SynDigitsDataModule(root=r),
        lambda r: StanfordDogsDataModule(root=r),
        lambda r: MIT67DataModule(root=r),
        lambda r: FGVCAircraftDataModule(root=r),
        lambda r: ImageNet100DataModule(root=r),
    ],
    ids=["svhn", "syn_digits", "stanford_dogs", "mit67", "fgvc_aircraft", "imagenet100"],
)
def test_missing_root_names_the_root(make: Callable, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    dm = make(str(missing))
    with pytest.raises(DataNotFoundError, match="does not exist") as e:
        dm.setup("fit")
    assert str(missing) in str(e.value)


def test_missing_root_is_one_line_from_kdl(kdl, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    base, override = RECIPES / "finegrained/teacher.yaml", RECIPES / "mit67/teacher.yaml"
    assert (
        kdl("fit", "--config", str(base), "--config", str(override), "--data.init_args.root", str(missing), *FAST) == 2
    )
    err = capsys.readouterr().err
    assert f"MIT67 not found: root={str(missing)!r} does not exist" in err and "Traceback" not in err
