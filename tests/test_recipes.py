"""Every recipe under recipes/ is exercised: one parametrised test runs it (``fast_dev_run``) on fake files of its
dataset, with a tiny teacher / S_sup where it names one; recipes that need the artifacts of earlier stages run
as chains in the test named in :data:`CHAINED`; tests/test_cli.py parses every recipe (``--print_config``).
Pipelines and sweeps have their own tests (test_pipeline.py, test_sweeps.py). A recipe that is in neither fails
:func:`test_nothing_under_recipes_is_left_out`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from tests.fake_datasets import (
    write_cifar,
    write_cub,
    write_image_folder,
    write_steering,
    write_tiny_imagenet,
    write_utkface,
)
from tests.fake_datasets_more import write_imagenet, write_svhn, write_syn_digits
from tests.helpers import (
    QUIET_TRAINER,
    RECIPES,
    SIZE32,
    is_section_file,
    make_fake_mnist,
    recipe_data_class,
    write_sskd_teacher_head,
    write_teacher,
)

TESTS = Path(__file__).parent
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: recipe (glob under recipes/) -> the test that runs it after the stages it needs ("file::function")
CHAINED: dict[str, str] = {
    "cgankd/cifar100/*.yaml": "test_cgankd_templates.py::test_the_cgankd_student_takes_a_step_on_a_store",
    "cgankd/utkface/*.yaml": "test_cgankd_templates.py::test_the_cgankd_student_takes_a_step_on_a_store",
    "cgankd/steering_angle/*.yaml": "test_cgankd_templates.py::test_the_cgankd_student_takes_a_step_on_a_store",
    "cgankd/*/*.yaml": "test_cgankd.py::test_every_cgankd_stage_recipe_runs_in_order",
    "mekd/fashion_mnist/kn.yaml": "test_blackbox_baselines.py::test_fashion_baselines_run",
    "mekd/fashion_mnist/kn_adaptive.yaml": "test_blackbox_baselines.py::test_fashion_baselines_run",
    "mekd/fashion_mnist/al.yaml": "test_blackbox_baselines.py::test_fashion_baselines_run",
    "mekd/fashion_mnist/dafl.yaml": "test_blackbox_baselines.py::test_fashion_baselines_run",
    "mekd/fashion_mnist/am.yaml": "test_blackbox_baselines.py::test_fashion_baselines_run",
    "mekd/fashion_mnist/db3kd.yaml": "test_blackbox_baselines.py::test_fashion_baselines_run",
    "mekd/baselines/*.yaml": "test_blackbox_baselines.py::test_baseline_templates",
    "mekd/fashion_mnist/*.yaml": (
        "test_mekd_recipes.py::test_mekd_stages_run_in_order_locally_and_against_a_live_server"
    ),
    "mekd/*.yaml": "test_datasets_more.py::test_mekd_templates",
    "*/ft_paraphraser*.yaml": "test_kd_stages.py::test_ft_and_ab_run_as_two_stages",
    "*/ft.yaml": "test_kd_stages.py::test_ft_and_ab_run_as_two_stages",
    "*/ft_resnet32x4_resnet8x4.yaml": "test_kd_stages.py::test_ft_and_ab_run_as_two_stages",
    "*/ab*.yaml": "test_kd_stages.py::test_ft_and_ab_run_as_two_stages",
    "fashion_mnist/takd*.yaml": "test_kd_stages.py::test_takd_chain_and_simkd_student_loads_without_its_teacher",
    "fashion_mnist/simkd.yaml": "test_kd_stages.py::test_takd_chain_and_simkd_student_loads_without_its_teacher",
    "fashion_mnist/cgan.yaml": "test_gans.py::test_fashion_gan_recipes_train_and_their_checkpoints_sample",
    "fashion_mnist/ccgan_*.yaml": "test_gans.py::test_fashion_gan_recipes_train_and_their_checkpoints_sample",
    "fashion_mnist/dcgan_latent10.yaml": "test_gans.py::test_fashion_gan_recipes_train_and_their_checkpoints_sample",
    "cifar100/cgan.yaml": "test_gans.py::test_cifar100_template_fast_dev_run",
    "*/ccgan*.yaml": "test_gans.py::test_ccgan_templates_run_both_ili_stages",
    "finegrained/*.yaml": "test_datasets_more.py::test_fine_grained_recipe_fast_dev_run",
    "fgvc_aircraft/*.yaml": "test_datasets_more.py::test_fine_grained_recipe_fast_dev_run",
    "mit67/*.yaml": "test_datasets_more.py::test_fine_grained_recipe_fast_dev_run",
    "stanford_dogs/*.yaml": "test_datasets_more.py::test_fine_grained_recipe_fast_dev_run",
    "fragments/wandb.yaml": "test_wandb.py::test_an_offline_run_logs_config_scalars_images_table_and_model",
}


def _imagenet(d: Path) -> list[str]:
    wnids = ["n01440764", "n01443537", "n01484850"]
    write_imagenet(d, wnids, n_train=6, n_val=2, size=32)
    (d / "classes.txt").write_text("\n".join(wnids) + "\n")
    return ["--data.init_args.root", str(d), "--data.init_args.class_list", str(d / "classes.txt"),
            "--data.init_args.holdout_size", "4"]  # fmt: skip


def _root(writer: Callable[[Path], object], *extra: str) -> Callable[[Path], list[str]]:
    def args(d: Path) -> list[str]:
        root = writer(d)
        return ["--data.init_args.root", str(root[0] if isinstance(root, tuple) else root), *extra]

    return args


#: data class -> (writes fake files under a folder and returns the arguments that point at them,
#: (classes (None: regression), channels, mean, std) of a teacher for them)
DATA: dict[str, tuple[Callable[[Path], list[str]], tuple]] = {
    "FashionMNISTDataModule": (_root(make_fake_mnist), (10, 1, (0.2860,), (0.3530,))),
    "DigitsDataModule": (lambda d: [], (10, 1, (0.3,), (0.38,))),
    "CIFAR10DataModule": (_root(write_cifar, "--data.init_args.batch_size", "8"), (10, 3, (0.5,) * 3, (0.25,) * 3)),
    "CIFAR100DataModule": (
        _root(lambda d: write_cifar(d, hundred=True), "--data.init_args.batch_size", "8"),
        (100, 3, (0.5,) * 3, (0.25,) * 3),
    ),
    "UTKFaceDataModule": (_root(write_utkface, *SIZE32), (None, 3, (0.5,) * 3, (0.5,) * 3)),
    "CUB200DataModule": (
        _root(lambda d: write_cub(d, num_classes=4, per_class=5, size=32), *SIZE32),
        (4, 3, *IMAGENET_STATS),
    ),
    "SteeringAngleDataModule": (_root(write_steering, "--data.init_args.min_per_interval", "9"), (None, 3)),
    "TinyImageNetDataModule": (_root(write_tiny_imagenet, *SIZE32), (4, 3)),
    "ImageFolderDataModule": (_root(write_image_folder, *SIZE32), (None, 3)),
    "SVHNDataModule": (_root(write_svhn, "--data.init_args.extra", "true"), (10, 3)),
    "SynDigitsDataModule": (_root(write_syn_digits), (10, 3)),
    "ImageNet100DataModule": (lambda d: [*_imagenet(d), *SIZE32], (3, 3)),
    "RotatedDataModule": (lambda d: ["--data.init_args.datamodule.init_args.root", str(write_cifar(d))], (None, 3)),
}
#: losses that pair the two nets' stages one to one: the fake teacher gets the layout of the recipe's teacher
#: (``runs/.../teacher_<net>/...``: a smaller net with the same stages) or else the student's
SAME_LAYOUT_LOSSES = ("ReviewKD", "SemCKD", "SimKD", "FT", "AB", "AT", "VID")
STAND_INS = {"resnet32x4": "resnet8x4"}


def _chained(recipe: Path) -> str | None:
    name = str(recipe.relative_to(RECIPES))
    return next((test for pattern, test in CHAINED.items() if fnmatch(name, pattern)), None)


def _recipes() -> list[Path]:
    """Every recipe but the pipelines' and sweeps' (a pipeline file has ``stages``) and the section files."""
    found = []
    for path in sorted(RECIPES.rglob("*.yaml")):
        top = path.relative_to(RECIPES).parts[0]
        content = yaml.safe_load(path.read_text()) or {}
        if top not in ("pipelines", "sweeps") and "stages" not in content and not is_section_file(path):
            found.append(path)
    return found


ALL = _recipes()
RUN_HERE = [r for r in ALL if _chained(r) is None]


def prepare(recipe: Path, tmp: Path) -> list[str]:
    """The arguments that run ``recipe`` on fake files: its data, a tiny teacher / S_sup / SSKD head."""
    writer, (classes, channels, *stats) = DATA[recipe_data_class(recipe)]
    args = writer(tmp / "data")
    init = yaml.safe_load(recipe.read_text())["model"].get("init_args") or {}
    losses = init.get("kd_losses") or []
    if "teacher" in init or "pretrained" in init:
        same = any(str(t.get("class_path", "")).rsplit(".", 1)[-1] in SAME_LAYOUT_LOSSES for t in losses)
        named = re.search(r"teacher_(\w+)/", str(init.get("teacher", "")))
        layout = STAND_INS.get(named.group(1), named.group(1)) if named else init.get("net", "tinynet")
        net = layout if same else init.get("net", "tinynet") if "pretrained" in init else "tinynet"
        model = write_teacher(tmp / "teacher.ckpt", classes, channels, None, *stats, net=net)
        args += ["--model.init_args.pretrained" if "pretrained" in init else "--model.init_args.teacher", str(model)]
        for term in losses:
            head = (term.get("init_args") or {}).get("teacher_head")
            if head:  # SSKD with the reference schedule: stage 1's SS module, at the recipe's (relative) path
                write_sskd_teacher_head(tmp / head, model, classes, channels, 32, *stats)
    return args


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe(recipe: Path, kdl, tmp_path: Path) -> None:
    """Runs the recipe under fast_dev_run on fake data (a chained one runs in its CHAINED test)."""
    text = yaml.safe_load(recipe.read_text())
    if "seed_everything" not in text:  # a partial recipe: its chained test stacks it onto its base
        assert _chained(recipe), f"{recipe}: a partial recipe needs the test that stacks it in CHAINED"
        return
    if "model" not in text:  # kdl generate's settings: not a kdl fit recipe
        assert _chained(recipe) and recipe.name == "generate.yaml"
        return
    if _chained(recipe):  # runs after its stages in the CHAINED test; test_cli.py parses every recipe
        return
    args = prepare(recipe, tmp_path)
    assert kdl("fit", "--config", str(recipe), "--trainer.fast_dev_run", "1", *QUIET_TRAINER, *args) == 0


def test_nothing_under_recipes_is_left_out() -> None:
    """Each recipe runs here (its data has a fake writer) or in a chained test that exists; each CHAINED entry
    matches a recipe (no stale entries)."""
    assert len(ALL) >= 100 and len(RUN_HERE) >= 40
    unknown = [str(r) for r in RUN_HERE if recipe_data_class(r) not in DATA]
    assert not unknown, f"recipes whose data class has no fake writer in tests/test_recipes.py DATA: {unknown}"
    names = [str(r.relative_to(RECIPES)) for r in ALL]
    stale = [p for p in CHAINED if not any(fnmatch(n, p) for n in names)]
    assert not stale, f"CHAINED entries that match no recipe: {stale}"
    for target in set(CHAINED.values()):
        module, function = target.split("::")
        defined = {n.name for n in ast.walk(ast.parse((TESTS / module).read_text())) if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"CHAINED names {target}, which does not exist"


def test_missing_teacher_is_one_clear_message(kdl, fake_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = RECIPES / "fashion_mnist" / "blkd.yaml"
    teacher = ["--model.init_args.teacher", "/no/such/teacher.ckpt"]
    assert kdl("fit", "--config", str(recipe), "--data.init_args.root", str(fake_mnist), *teacher) == 2
    err = capsys.readouterr().err
    assert "'/no/such/teacher.ckpt' does not exist" in err and "Traceback" not in err
