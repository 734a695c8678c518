"""The paper's cGAN-KD settings as GPU templates (CIFAR-100, UTKFace, Steering Angle): every recipe parses with
kdl's parser and its data resolves on fake files of the dataset's format, every pipeline plans all its stages and
its references are consistent, and each setting's cGAN-KD student takes one step on a tiny store."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import kd_lightning.data as kdl_data
from kd_lightning import pipeline
from kd_lightning.cli import main as kdl_main
from kd_lightning.methods import ImageClassifier, ImageRegressor
from kd_lightning.methods.gan import CcGAN, ConditionalGAN
from kd_lightning.sampling.generate import GenerateConfig, build_parser, generate
from tests.fake_datasets import write_cifar, write_steering, write_utkface
from tests.helpers import REPO, save_module

SETTINGS = ("cifar100", "utkface", "steering_angle")
KD = ("blkd", "fitnet", "vid", "rkd", "crd", "sskd")
#: the stages each pipeline must have, in order
STAGES = {
    "cifar100": [
        "teacher", "student", "cgan", "dr", "generate", "sskd_head", "student_cgankd",
        *[f"student_cgankd_{x}" for x in KD], "test_student", "test_cgankd", *[f"test_cgankd_{x}" for x in KD],
    ],
    **{
        s: [
            "teacher", "student", "embedding", "cgan", "dr", "generate", "student_cgankd", "student_cgankd_fitnet",
            "fitnet", "test_student", "test_fitnet", "test_cgankd", "test_cgankd_fitnet",
        ]
        for s in ("utkface", "steering_angle")
    },
}  # fmt: skip
#: data options the fake files need (the fake Steering Angle set has 60 frames: smaller angle intervals)
FAKE_DATA_ARGS = {"steering_angle": {"min_per_interval": 9}}
WRITERS = {
    "cifar100": lambda root: write_cifar(root, hundred=True),
    "utkface": lambda root: write_utkface(root, ages=(1, 10, 20, 30, 45, 60), per_age=10),
    "steering_angle": lambda root: write_steering(root)[0],
}


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {s: WRITERS[s](tmp_path_factory.mktemp(s)) for s in SETTINGS}


def load(setting: str, *args: str) -> list[pipeline.Step]:
    return pipeline.load(["--config", f"recipes/cgankd/{setting}/pipeline.yaml", *args])[0]


def printed_config(argv: list[str]) -> dict[str, Any]:
    """``kdl <argv> --print_config``: the config kdl's own parser resolves (exit status 0 asserted)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = kdl_main([*argv, "--print_config"])
        except SystemExit as e:  # --print_config exits after printing
            status = int(e.code or 0)
    assert status == 0, " ".join(argv)
    return yaml.safe_load(out.getvalue())


def real_datamodule(data: dict[str, Any], extra: dict[str, Any]) -> Any:
    """The real DataModule of a printed ``data`` section (the inner one of an AugmentedDataModule)."""
    if data["class_path"].endswith("AugmentedDataModule"):
        data = data["init_args"]["datamodule"]
    cls = getattr(kdl_data, data["class_path"].rsplit(".", 1)[-1])
    return cls(**{**data["init_args"], **extra})


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_pipeline_plans_every_stage(setting: str, fake_roots: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = pipeline.main(
            ["--config", f"recipes/cgankd/{setting}/pipeline.yaml", "--vars.root", str(tmp_path / "r"),
             "--vars.data_root", str(fake_roots[setting]), "--dry-run"]
        )  # fmt: skip
    assert status == 0
    plan = [m.groups() for m in re.finditer(r"^\[\s*\d+/\d+\] (\S+)\s+(\S+)", out.getvalue(), re.M)]
    assert plan == [(name, "run") for name in STAGES[setting]]  # nothing exists yet: every stage runs, none blocked
    commands = [line.strip() for line in out.getvalue().splitlines() if line.strip().startswith("$ kdl")]
    assert len(commands) == len(STAGES[setting]) and all(
        str(fake_roots[setting]) in c for c in commands if " fit " in c
    )


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_student_is_tested_and_the_references_are_consistent(setting: str, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    steps = {s.name: s for s in load(setting)}
    recipes = {p.name for p in (REPO / "recipes/cgankd" / setting).glob("*.yaml")} - {"pipeline.yaml"}
    used = {Path(c).name for s in steps.values() for c in s.argv[1::2] if c.startswith(f"recipes/cgankd/{setting}/")}
    assert recipes <= used  # every template of the setting is a stage of its pipeline
    fits = [s for s in steps.values() if s.command == "fit" and (s.name.startswith("student") or s.name == "fitnet")]
    for fit in fits:  # the test stage of a student: same folder, recipe and overrides, plus its best checkpoint
        test = steps["test_" + fit.name.removeprefix("student_")] if fit.name != "student" else steps["test_student"]
        assert test.command == "test" and test.dir == fit.dir
        assert test.spec["config"] == {**fit.spec["config"], "ckpt_path": fit.artifacts["best"]}
    assert {"cgan.last", "dr.best", "teacher.best"} <= set(steps["generate"].refs) and steps["generate"].overwrite
    assert "embedding.last" in steps["cgan"].refs or setting == "cifar100"
    store = steps["generate"].artifacts["store"]
    for s in steps.values():
        if s.name.startswith("student_cgankd"):  # fine-tuned from NOKD, on the one store
            cfg = s.spec["config"]
            assert {"generate.store", "student.best"} <= set(s.refs)
            assert cfg["data"]["init_args"]["store"] == store and s.dir.endswith("/seed0")
            assert cfg["model"]["init_args"]["net_weights"] == steps["student"].artifacts["best"]
    rho = 0.9 if setting == "cifar100" else 0.7
    assert steps["generate"].spec["config"]["rho"] == rho
    # another seed moves the students only; another rho reaches the store's stage
    again = {s.name: s for s in load(setting, "--vars.seed", "3", "--vars.rho", "0.5", "--vars.student_init", "null")}
    for name, s in steps.items():
        assert (again[name].dir == s.dir) == (name in ("teacher", "embedding", "cgan", "dr", "generate", "sskd_head"))
    assert again["generate"].spec["config"]["rho"] == 0.5
    assert again["student_cgankd"].spec["config"]["model"]["init_args"]["net_weights"] is None  # from scratch


def test_the_kd_teacher_can_differ_from_the_filtering_teacher(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    steps = {s.name: s for s in load("cifar100")}
    primary = steps["teacher"].artifacts["best"]
    kd_stages = [f"student_cgankd_{x}" for x in KD] + ["sskd_head"]
    assert all(steps[n].spec["config"]["model"]["init_args"]["teacher"] == primary for n in kd_stages)
    other = "runs/elsewhere/resnet110/checkpoints/best.ckpt"
    moved = {s.name: s for s in load("cifar100", "--vars.kd_teacher", other, "--vars.teacher_net", "densenet121_cifar")}
    assert all(moved[n].spec["config"]["model"]["init_args"]["teacher"] == other for n in kd_stages)
    assert all(other in moved[n].paths for n in kd_stages)  # its bytes are hashed: a retrained one reruns them
    assert moved["generate"].spec["config"]["teacher"] == primary
    assert moved["dr"].spec["config"]["model"]["init_args"]["encoder"] == primary
    assert moved["teacher"].spec["config"]["model"]["init_args"]["net"] == "densenet121_cifar"
    sskd = moved["student_cgankd_sskd"].spec["config"]["model"]["init_args"]["kd_losses"][0]["init_args"]
    assert sskd["teacher_head"] == moved["sskd_head"].artifacts["best"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_stage_parses_and_its_data_resolves_on_fake_files(
    setting: str, fake_roots: dict[str, Path], monkeypatch
) -> None:
    monkeypatch.chdir(REPO)
    extra = FAKE_DATA_ARGS.get(setting, {})
    steps = load(setting, "--vars.data_root", str(fake_roots[setting]))
    sizes: dict[str, int] = {}
    for step in steps:
        if step.command == "generate":  # kdl generate's own parser and settings class
            ns = build_parser().parse_args(step.argv).as_dict()
            ns.pop("config", None)
            ns.pop("quiet", None)  # a command-line switch of kdl generate, not a setting
            gen = GenerateConfig(**ns)
            assert gen.device == "cuda" and gen.rho == (0.9 if setting == "cifar100" else 0.7) and gen.subsample
            if setting == "cifar100":  # classification: 5,000 accepted per class, no replacement
                assert (gen.per_class, gen.replace) == (5000, False)
            else:  # regression: a label grid, labels replaced by the teacher's predictions
                assert gen.replace and gen.per_value and gen.n_label_values > 1
            continue
        if step.command != "fit":  # test stages repeat a fit stage's config (checked above)
            continue
        cfg = printed_config(["fit", *step.argv])
        assert cfg["trainer"]["default_root_dir"] == step.dir
        dm = real_datamodule(cfg["data"], extra)
        key = repr((type(dm).__name__, sorted(cfg["data"].get("init_args", {}).items(), key=str)))
        if key not in sizes:
            dm.setup("fit")
            sizes[key] = len(dm.train_dataset)
        assert sizes[key] > 0 and str(fake_roots[setting]) == str(dm.root)
    by = {s.name: printed_config(["fit", *s.argv]) for s in steps if s.name in ("student", "student_cgankd")}
    student_net = by["student"]["model"]["init_args"]["net"]
    assert by["student_cgankd"]["model"]["init_args"]["net"] == student_net  # fine-tuning needs the same net
    assert by["student_cgankd"]["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.01
    fakes = {"cifar100": 100_000, "utkface": 60_000, "steering_angle": 50_000}[setting]  # the paper's M^g
    assert by["student_cgankd"]["data"]["init_args"]["max_fake"] == fakes


# ---------------------------------------------------------------------- one step of each cGAN-KD student
def tiny_store(setting: str, folder: Path) -> Path:
    """A few filtered (and, for regression, relabelled) samples of an untrained GAN, in the setting's image format."""
    torch.manual_seed(0)
    size = 32 if setting == "cifar100" else 64
    common = dict(z_dim=8, g_ch=4, d_ch=4, in_channels=3, image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
    if setting == "cifar100":
        gan: Any = ConditionalGAN(num_classes=100, shared_dim=8, **common)
        teacher: Any = ImageClassifier(net="tinynet", num_classes=100, in_channels=3, image_size=size)
        counts: dict[str, Any] = {"per_class": 1}
    else:
        gan = CcGAN(label_range=(1.0, 60.0), **common)
        teacher = ImageRegressor(net="tinynet", in_channels=3, image_size=size, label_range=(1.0, 60.0))
        counts = {"per_value": 4, "label_values": [0.2, 0.5, 0.8]}
    g = save_module(gan, folder / "gan.ckpt", type(gan))
    t = save_module(teacher, folder / "teacher.ckpt", type(teacher))
    out = folder / "store"
    generate(GenerateConfig(generator=str(g), teacher=str(t), out=str(out), burn_in=10, progress=False, **counts))
    return out


@pytest.mark.slow  # ~10-25 s of CPU per setting (the CIFAR-100 store has 100 classes); the parse tests are the default
@pytest.mark.parametrize("setting", SETTINGS)
def test_the_cgankd_student_takes_a_step_on_a_store(
    setting: str, fake_roots: dict[str, Path], kdl, tmp_path: Path
) -> None:
    recipe = REPO / "recipes/cgankd" / setting / "student_cgankd.yaml"
    store = tiny_store(setting, tmp_path)
    inner = "--data.init_args.datamodule.init_args."
    extra = [f"{inner}{k}={v}" for k, v in FAKE_DATA_ARGS.get(setting, {}).items()]
    args = ["--trainer.fast_dev_run", "1", "--model.init_args.net_weights", "null", f"--data.init_args.store={store}",
            f"{inner}root={fake_roots[setting]}", f"{inner}batch_size=8", *extra]  # fmt: skip
    assert kdl("fit", "--config", str(recipe), *args) == 0
