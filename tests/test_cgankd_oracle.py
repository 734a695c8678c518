"""cGAN-KD's controls and options: the oracle store, relabelling, M^g as a multiple of D^r, augmented fakes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import AugmentedDataModule, DigitsDataModule, FilteredDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.sampling import open_store
from kd_lightning.sampling.generate import generate
from kd_lightning.sampling.oracle import OracleConfig, build_oracle, held_out_indices
from kd_lightning.sampling.oracle import main as oracle_main
from tests.helpers import REPO, cfg


@pytest.fixture(scope="module")
def gan_store(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gan_store") / "s"
    generate(cfg(parts, out, per_class=6))
    return out


def real_digits(**kw: object) -> DigitsDataModule:
    args: dict[str, object] = {"batch_size": 32, "image_size": 16, "augment": False, "train_size": 500, **kw}
    return DigitsDataModule(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def oracle_store(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("oracle") / "o"
    build_oracle(
        OracleConfig(teacher=str(parts["teacher"]), out=str(out), per_class=6, batch_size=4, shard_size=8),
        real_digits(),
    )
    return out


def _layout(root: Path) -> dict[str, object]:
    store = open_store(root)
    m = store.manifest
    shard = store.read_shard(0)
    table = store.table()
    return {
        "manifest": sorted(m),
        "settings": sorted(k for k in m["settings"] if k != "oracle"),
        "progress": sorted(next(iter(m["progress"].values()))),
        "shard_entry": sorted(m["shards"][0]),
        "units": sorted({s["unit"] for s in m["shards"]}),
        "shard": {k: (v.dtype.str, v.shape[1:]) for k, v in sorted(shard.items())},
        "table": {k: (v.dtype.str, v.shape[1:]) for k, v in sorted(table.columns.items())},
        "report": sorted(m["report"]),
        "files": sorted(p.name for p in root.iterdir() if not p.name.startswith("shard-")),
    }


def test_oracle_store_has_the_format_of_a_generated_store(gan_store: Path, oracle_store: Path) -> None:
    assert _layout(oracle_store) == _layout(gan_store)
    assert open_store(oracle_store).settings["oracle"]["train_size"] == 500


def test_oracle_store_holds_held_out_real_images_with_true_labels(parts: dict[str, Path], oracle_store: Path) -> None:
    dm = real_digits()
    base = dm.build_dataset("train")
    train_idx, val_idx = dm._split_indices(base)
    store = open_store(oracle_store)
    table = store.table()
    index = table["proposal"]  # the image's index in the real training set
    assert len(index) == 60 and len(set(index.tolist())) == 60
    assert not set(index.tolist()) & (set(train_idx.tolist()) | set(val_idx.tolist()))
    assert set(index.tolist()) <= set(held_out_indices(dm).tolist())
    images = store.load_images()
    for row, i in enumerate(index):
        image, label = base[int(i)]
        padded = torch.nn.functional.pad(image, [4, 4, 4, 4])  # 8 px digits centred on the 16 px canvas
        assert np.array_equal(images[row], padded.numpy()) and table["label"][row] == int(label)
    assert np.bincount(table["label"], minlength=10).tolist() == [6] * 10
    # the same M2 as kdl generate: per-class 0.9 quantile of the teacher's CE on the true label
    err = table["error"].astype(np.float64)
    for c in range(10):
        sel = table["label"] == c
        assert table["kept"][sel].tolist() == (err[sel] <= np.quantile(err[sel], 0.9)).tolist()
    assert (table["final_label"] == table["label"]).all()


def test_oracle_refuses_a_pool_too_small_and_bad_input_exits_2(parts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"only .* held-out images of class 0"):
        build_oracle(OracleConfig(teacher=str(parts["teacher"]), out=str(tmp_path / "o"), per_class=100), real_digits())
    argv = ["--teacher", str(parts["teacher"]), "--out", str(tmp_path / "o2"), "--per_class", "5"]
    assert oracle_main([*argv, "--data", "DigitsDataModule", "--data.image_size", "16"]) == 2  # no subset: no pool
    ok = [*argv, "--data", "DigitsDataModule", "--data.image_size", "16", "--data.train_size", "500"]
    assert oracle_main(ok) == 0 and open_store(tmp_path / "o2").report["n_accepted"] == 50


def test_relabel_gives_the_teachers_labels_and_the_default_the_stores(gan_store: Path) -> None:
    table = open_store(gan_store).table()
    kept = table["kept"].astype(bool)
    teacher_labels = table["teacher"][kept].argmax(1)
    assert (teacher_labels != table["label"][kept]).any()  # the tiny teacher disagrees somewhere
    paper = FilteredDataModule(str(gan_store), real_digits())
    official = FilteredDataModule(str(gan_store), real_digits(), relabel=True)
    for dm in (paper, official):
        dm.setup("fit")
    assert paper.train_dataset.labels.tolist() == table["label"][kept].tolist()
    assert official.train_dataset.labels.tolist() == teacher_labels.tolist()
    aug = AugmentedDataModule(real_digits(), str(gan_store), relabel=True)
    aug.setup("fit")
    assert aug.train_dataset.datasets[1].labels.tolist() == teacher_labels.tolist()


def test_fake_ratio_takes_a_multiple_of_the_real_set(oracle_store: Path) -> None:
    labels = {}
    for ratio in (0.0, 0.02, 0.1):
        dm = AugmentedDataModule(real_digits(), str(oracle_store), filtered=False, fake_ratio=ratio)
        dm.setup("fit")
        assert dm.n_fake == round(ratio * dm.n_real)
        labels[ratio] = dm.train_dataset.datasets[1].labels
    assert np.bincount(labels[0.1], minlength=10).tolist() == [5] * 10  # 50 of the 60: the class shares kept
    assert set(np.bincount(labels[0.02], minlength=10).tolist()) == {1}
    too_many = AugmentedDataModule(real_digits(), str(oracle_store), fake_ratio=1.0)
    with pytest.raises(ConfigError, match=r"fake_ratio=1\.0 asks for \d+ fake samples"):
        too_many.setup("fit")


def test_fake_images_get_the_real_images_augmentation(oracle_store: Path) -> None:
    dm = AugmentedDataModule(real_digits(augment=True), str(oracle_store), filtered=False)
    dm.setup("fit")
    fake = dm.train_dataset.datasets[1]
    stored = torch.from_numpy(open_store(oracle_store).load_images()[: len(fake)]).float() / 255
    torch.manual_seed(0)
    draws = torch.stack([fake[i]["image"] for i in range(len(fake))])
    assert draws.shape == stored.shape
    moved = (draws - stored).abs().flatten(1).amax(1) > 1e-3
    assert moved.float().mean() > 0.5  # random crops moved most of them
    plain = AugmentedDataModule(real_digits(), str(oracle_store), filtered=False)
    plain.setup("fit")
    again = torch.stack([plain.train_dataset.datasets[1][i]["image"] for i in range(len(fake))])
    assert torch.allclose(again, stored, atol=1e-6)  # no augmentation: the stored image (up to x/255 rounding)


# ---------------------------------------------------------------------- a store no better than chance
STORE_WRITER = """
import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
consistency = float(sys.argv[sys.argv.index("--consistency") + 1])
os.makedirs(out, exist_ok=True)
units = [[f"class-{c}", c, 5] for c in range(10)]
manifest = {"finished": True, "settings": {"task": "classification", "units": units},
            "report": {"label_consistency_before": consistency, "label_consistency_after": consistency}}
open(os.path.join(out, "manifest.json"), "w").write(json.dumps(manifest))
"""


@pytest.mark.parametrize("consistency", [0.084, 0.85])
def test_pipeline_warns_loudly_when_a_store_is_no_better_than_chance(
    consistency: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from kd_lightning import pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "writer.py").write_text(STORE_WRITER)
    monkeypatch.setenv(pipeline.LAUNCHER_ENV, f"{sys.executable} {tmp_path / 'writer.py'}")
    (tmp_path / "pipe.yaml").write_text(
        "stages:\n  - name: generate\n    command: generate\n    dir: runs/g\n"
        f"    args: {{out: runs/store, consistency: {consistency}}}\n    outputs: {{store: runs/store}}\n"
    )
    assert pipeline.main(["--config", "pipe.yaml"]) == 0
    err = capsys.readouterr().err
    if consistency < 0.2:
        assert "stage 'generate': WARNING: the store's label consistency is 8.4% before filtering" in err
        assert "no better than 2x chance (10.0% for 10 classes)" in err
    else:
        assert "WARNING" not in err


def test_kdl_generate_warns_when_the_store_is_at_chance(
    parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kd_lightning.sampling.consistency import chance_warning
    from kd_lightning.sampling.generate import main as generate_main

    argv = ["--generator", str(parts["gan"]), "--density_ratio", str(parts["dr"]), "--teacher", str(parts["teacher"])]
    argv += [
        "--out",
        str(tmp_path / "s"),
        "--per_class",
        "4",
        "--burn_in",
        "20",
        "--batch_size",
        "8",
        "--progress",
        "false",
    ]
    assert generate_main(argv) == 0
    before = open_store(tmp_path / "s").report["label_consistency_before"]
    err = capsys.readouterr().err
    assert ("WARNING: the store's label consistency" in err) == (before <= 0.2)
    assert chance_warning({"label_consistency_before": 0.21}, 10) is None
    assert chance_warning({"label_consistency_before": 0.2}, 10) is not None
    assert "train the teacher first" in str(chance_warning({"label_consistency_before": 0.1}, 10, oracle=True))


# ---------------------------------------------------------------------- the Fashion-MNIST pipeline's arms
FM_PIPELINE = "recipes/cgankd/fashion_mnist/pipeline.yaml"


def _fm_steps(*extra: str) -> dict[str, object]:
    from kd_lightning.pipeline import load

    steps, _ = load(["--config", str(REPO / FM_PIPELINE), *extra])
    return {s.name: s for s in steps}


def _arg(step: object, key: str) -> str | None:
    argv = step.argv  # type: ignore[attr-defined]
    return argv[argv.index(key) + 1] if key in argv else None


def test_fashion_pipeline_has_every_arm_with_augmentation_and_the_mg_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    steps = _fm_steps()
    arms = ["realonly", "cgankd", "cgankd_blkd", "cgankd_relabel", "cgankd_no_m1", "cgankd_no_m2", "oracle"]
    for arm in arms:
        assert f"student_{arm}" in steps and f"test_{arm}" in steps
    assert steps["oracle"].command == "oracle"
    cgan = steps["cgan"]
    assert "recipes/cgankd/fashion_mnist/cgan_long.yaml" in cgan.argv  # type: ignore[attr-defined]
    long = (REPO / "recipes/cgankd/fashion_mnist/cgan_long.yaml").read_text()
    assert "diffaugment: color,translation,cutout" in long
    assert "GANQuality" in str(_arg(cgan, "--trainer.callbacks")) and _arg(cgan, "--trainer.max_steps") == "24000"
    for name in ("student", "blkd"):
        assert _arg(steps[name], "--data.init_args.augment") == "true"
    for name in ("blkd", "student_cgankd_blkd"):  # augmented images: no cached teacher logits
        assert _arg(steps[name], "--model.init_args.cache_teacher") == "false"
    for arm in arms:
        step = steps[f"student_{arm}"]
        assert _arg(step, "--data.init_args.datamodule.init_args.augment") == "true"  # crop + flip on every arm
        assert _arg(step, "--data.init_args.fake_ratio") == ("0" if arm == "realonly" else "2")
    assert _arg(steps["student_cgankd_relabel"], "--data.init_args.relabel") == "true"
    assert _arg(steps["student_cgankd_no_m2"], "--data.init_args.filtered") == "false"
    assert _arg(steps["generate_no_m1"], "--subsample") == "false"
    assert _arg(steps["student_oracle"], "--data.init_args.store") == _arg(steps["oracle"], "--out")
    assert _arg(steps["generate"], "--per_class") == _arg(steps["oracle"], "--per_class") == "1200"
    half = _fm_steps("--vars.m_g", "0.5", "--vars.store_per_class", "300")
    assert _arg(half["student_oracle"], "--data.init_args.fake_ratio") == "0.5"
    assert _arg(half["student_cgankd"], "--data.init_args.fake_ratio") == "0.5"
    assert _arg(half["oracle"], "--per_class") == _arg(half["generate"], "--per_class") == "300"
    assert half["student_cgankd"].dir.endswith("cgankd/mg0.5/seed0")


def test_cgankd_docs_state_the_official_settings() -> None:
    doc = (REPO / "docs/cgankd.md").read_text()
    assert "fixed after the burn-in (the paper)" not in doc
    assert "uses lambda 0.01" in doc and "adjust_True" in doc
    assert "the evidence used 3 (below)" not in doc
    gen = (REPO / "recipes/cgankd/fashion_mnist/generate.yaml").read_text()
    assert "~3%" not in gen and "~20 min" not in gen and "13.4%" in gen
    for name in ("cifar100", "utkface", "steering_angle"):
        assert "burn-in (the paper;" not in (REPO / f"recipes/cgankd/{name}/generate.yaml").read_text()
    pipe = (REPO / FM_PIPELINE).read_text()
    assert "the paper's limited-data regime" not in pipe and "full CIFAR-100 / ImageNet-100" in pipe
