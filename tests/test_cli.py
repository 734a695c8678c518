"""The kdl command: help, recipes, links, checkpoints, and short errors for user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import kd_lightning.methods
from kd_lightning.cli import build_cli, cpu_has_fast_bf16
from kd_lightning.errors import CheckpointError
from kd_lightning.methods import ImageClassifier
from tests.helpers import RECIPES, recipe_model_class

# partial configs stacked onto a recipe (fragments/, the fine-grained sets' per-dataset overrides and data
# files, tested in test_datasets_more.py): every full recipe sets seed_everything, a partial one does not
FRAGMENTS = sorted(p for p in RECIPES.rglob("*.yaml") if "seed_everything" not in yaml.safe_load(p.read_text()))
# kdl fit recipes; kdl generate's recipes (generate.yaml, no model) run in tests/test_cgankd.py
ALL_RECIPES = sorted(
    r for r in set(RECIPES.rglob("*.yaml")) - set(FRAGMENTS) if "model" in (yaml.safe_load(r.read_text()) or {})
)
#: model classes that recipes name ahead of their implementation (their recipes' tests skip until they exist)
PENDING_MODELS: dict[str, str] = {}


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str], kdl) -> None:
    assert kdl("--help") == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_help_lists_every_command_without_importing_lightning() -> None:
    """``kdl --help`` answers at once: building the command list imports neither Lightning nor torch."""
    from kd_lightning.commands import TOOL_COMMANDS

    code = (
        "import contextlib, io, sys\n"
        "from kd_lightning import commands\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    status = commands.main(['--help'])\n"
        "print(status, 'lightning' in sys.modules, 'torch' in sys.modules)\n"
        "print(out.getvalue())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, _, help_text = done.stdout.partition("\n")
    assert first == "0 False False"
    for name in ("fit", "validate", "test", "predict", *TOOL_COMMANDS):
        assert f"kdl {name} " in help_text


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_prints_its_config(recipe: Path, kdl, capsys: pytest.CaptureFixture[str]) -> None:
    pending = recipe_model_class(recipe)
    if pending in PENDING_MODELS and not hasattr(kd_lightning.methods, pending):
        pytest.skip(f"{pending} is not in kd_lightning.methods yet ({PENDING_MODELS[pending]})")
    assert kdl("fit", "--config", str(recipe), "--print_config") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] and cfg["data"]["class_path"]
    assert cfg["seed_everything"] is not None  # every recipe is seeded


def test_wandb_fragment_stacks_onto_a_recipe(kdl, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        kdl(
            "fit",
            "--config",
            str(RECIPES / "digits/student.yaml"),
            "--config",
            str(RECIPES / "fragments/wandb.yaml"),
            "--print_config",
        )
        == 0
    )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    assert cfg["model"]["init_args"]["net"] == "resnet8"


def test_data_facts_are_linked_into_the_model(fake_mnist: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["--config", str(RECIPES / "fashion_mnist/student.yaml"), "--data.init_args.root", str(fake_mnist)], run=False
    )
    hp = cli.model.hparams
    assert (hp.num_classes, hp.in_channels, hp.image_size) == (10, 1, 32)
    assert hp.mean == pytest.approx((0.2860,)) and hp.std == pytest.approx((0.3530,))
    assert cli.model.normalize.mean.flatten().tolist() == pytest.approx([0.2860])
    assert cli.model.net.fc.out_features == 10 and cli.model.net.conv1.in_channels == 1


def test_fit_writes_last_and_best_checkpoints_and_can_rerun(kdl, fake_mnist: Path, tmp_path: Path) -> None:
    args = [
        "fit",
        "--config",
        str(RECIPES / "fashion_mnist/student.yaml"),
        "--data.init_args.root",
        str(fake_mnist),
        "--trainer.default_root_dir",
        "run",
        "--model.init_args.net",
        "tinynet",
        "--trainer.max_epochs",
        "2",
    ]
    assert kdl(*args) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "best.ckpt").is_file()
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1
    monitor = next(v for k, v in last["callbacks"].items() if "KDCheckpoint" in k)
    assert monitor["monitor"] == "val/acc1"
    assert list(tmp_path.glob("run/lightning_logs/version_*/config.yaml"))
    assert kdl(*args) == 0  # saving the config again never fails
    # a resumed run continues from last.ckpt
    assert kdl(*args[:-2], "--trainer.max_epochs", "3", "--ckpt_path", "last") == 0
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["epoch"] == 2


def test_test_subcommand_reports_metrics(kdl, fake_mnist: Path, tmp_path: Path) -> None:
    common = [
        "--config",
        str(RECIPES / "fashion_mnist/student.yaml"),
        "--data.init_args.root",
        str(fake_mnist),
        "--trainer.default_root_dir",
        "run",
        "--model.init_args.net",
        "tinynet",
    ]
    assert kdl("fit", *common, "--trainer.max_epochs", "1") == 0
    assert kdl("test", *common, "--ckpt_path", "run/checkpoints/best.ckpt") == 0
    metrics = sorted(tmp_path.glob("run/lightning_logs/version_*/metrics.csv"))[-1].read_text()
    for name in ("test/acc1", "test/acc5", "test/f1", "test/ece"):
        assert name in metrics


@pytest.mark.parametrize(
    ("given", "parsed"), [("1", 1), ("3", 3), ("1.0", 1.0), ("0.25", 0.25), ("null", None)], ids=str
)
def test_limit_batches_keep_ints_and_fractions_apart(kdl, capsys, given: str, parsed: object) -> None:
    """Lightning reads an int as a number of batches and a float as a fraction: ``1`` must not become 1.0 (100 %)."""
    keys = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
    args = [tok for key in keys for tok in (f"--trainer.{key}", given)]
    assert kdl("fit", "--config", str(RECIPES / "digits/student.yaml"), *args, "--print_config") == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    for key in keys:
        assert trainer[key] == parsed and type(trainer[key]) is type(parsed), (key, trainer[key])


def test_predict_writes_its_predictions_in_the_run_folder(kdl, capsys, tmp_path: Path) -> None:
    from kd_lightning.data import DigitsDataModule
    from tests.helpers import QUIET_TRAINER

    recipe = str(RECIPES / "digits/student.yaml")
    args = ["--model.init_args.net", "tinynet", "--data.init_args.train_size", "64", "--trainer.max_epochs", "1"]
    args += [*QUIET_TRAINER, "--trainer.default_root_dir", "run"]
    assert kdl("fit", "--config", recipe, *args) == 0
    capsys.readouterr()
    assert kdl("predict", "--config", recipe, *args, "--ckpt_path", "best") == 0
    n = len(DigitsDataModule().build_dataset("test"))
    assert f"kdl predict: wrote {n} predictions to {Path('run') / 'predictions.pt'}" in capsys.readouterr().err
    out = torch.load(tmp_path / "run" / "predictions.pt", weights_only=True)
    assert sorted(out) == ["index", "label", "logits"]
    assert out["logits"].shape == (n, 10) and torch.equal(out["index"], torch.arange(n))
    assert torch.equal(out["label"], DigitsDataModule().build_dataset("test").labels)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd_lightning.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_missing_data_root_is_one_clear_message(tmp_path: Path) -> None:
    res = run_cli(
        "fit",
        "--config",
        str(RECIPES / "fashion_mnist/teacher.yaml"),
        "--data.init_args.root",
        "/does/not/exist",
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    message = res.stderr[res.stderr.index("kdl: error:") :]
    lines = message.splitlines()  # the error, where datasets come from, how to see the traceback
    assert "/does/not/exist" in lines[0] and "docs/datasets.md" in lines[1] and len(lines) == 3


def test_typo_key_and_bad_values_are_named(tmp_path: Path) -> None:
    res = run_cli(
        "fit", "--config", str(RECIPES / "fashion_mnist/teacher.yaml"), "--model.init_args.nett", "x", cwd=tmp_path
    )
    assert res.returncode == 2 and "nett" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(
        "fit", "--config", str(RECIPES / "fashion_mnist/teacher.yaml"), "--trainer.max_epohs", "3", cwd=tmp_path
    )
    assert res.returncode == 2 and "max_epohs" in res.stderr
    res = run_cli(
        "fit", "--config", str(RECIPES / "fashion_mnist/teacher.yaml"), "--model.init_args.net", "resnet9", cwd=tmp_path
    )
    assert res.returncode == 2 and "resnet9" in res.stderr and "resnet8" in res.stderr and "Traceback" not in res.stderr


def test_debug_flag_shows_traceback(tmp_path: Path) -> None:
    res = run_cli(
        "fit",
        "--config",
        str(RECIPES / "fashion_mnist/teacher.yaml"),
        "--data.init_args.root",
        "/does/not/exist",
        "--debug",
        cwd=tmp_path,
    )
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_wrong_checkpoint_is_refused_clearly(kdl, fake_mnist: Path, tmp_path: Path, capsys) -> None:
    base = [
        "--config",
        str(RECIPES / "fashion_mnist/student.yaml"),
        "--data.init_args.root",
        str(fake_mnist),
        "--trainer.default_root_dir",
        "run",
        "--model.init_args.net",
        "tinynet",
    ]
    assert kdl("fit", *base, "--trainer.max_epochs", "1") == 0
    # a checkpoint for another number of classes
    with pytest.raises(CheckpointError, match=r"checkpoint does not fit.*shape differs: net.fc"):
        ImageClassifier.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt", num_classes=5)
    # a file that is no checkpoint at all
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert kdl("test", *base, "--ckpt_path", "junk.ckpt") == 2
    err = capsys.readouterr().err
    assert "junk.ckpt" in err and "cannot be read" in err


@pytest.mark.skipif(cpu_has_fast_bf16(), reason="this CPU has AMX bf16")
def test_bf16_on_slow_cpu_warns(fake_mnist: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="bf16"):
        build_cli(
            [
                "--config",
                str(RECIPES / "fashion_mnist/student.yaml"),
                "--trainer.accelerator",
                "cpu",
                "--trainer.precision",
                "bf16-mixed",
                "--data.init_args.root",
                str(fake_mnist),
            ],
            run=False,
        )


def test_quiet_lightning_drops_only_the_manual_step_checkpoint_warning(tmp_path: Path) -> None:
    """A ModelCheckpoint every N steps in manual optimisation (kdl's GANs) warns at each save; kdl drops that one."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_warn
    from torch.utils.data import DataLoader, TensorDataset

    from kd_lightning.cli import quiet_lightning

    class Manual(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = torch.nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.net(batch[0]).pow(2).mean())
            opt.step()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit_warnings(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                quiet_lightning()
            trainer = L.Trainer(
                default_root_dir=tmp_path,
                max_steps=2,
                accelerator="cpu",
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_top_k=-1)],
            )
            trainer.fit(Manual(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))
            rank_zero_warn("Using ModelCheckpoint with manual optimization: another warning, which still shows")
        return [str(w.message) for w in caught]

    step_warning = "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization"
    loud = fit_warnings(quiet=False)
    assert any(m.startswith(step_warning) for m in loud)  # Lightning still says it (else this test pins nothing)
    quiet = fit_warnings(quiet=True)
    assert not any(m.startswith(step_warning) for m in quiet)
    assert any("another warning, which still shows" in m for m in quiet)
    assert sorted((tmp_path / "steps").iterdir())  # the step snapshots are written all the same


def test_names_that_moved_out_of_cli_stay_importable_from_it() -> None:
    """cli.py's parts moved to their own modules; the old import path gives the same objects."""
    import kd_lightning.cli as cli
    from kd_lightning import cli_errors, cpu, wandb_media
    from kd_lightning.callbacks import checkpoint, progress

    moved = {
        checkpoint: ("KDCheckpoint", "resolve_ckpt_path", "named_checkpoint"),
        progress: ("quiet_lightning", "quiet_console"),
        cpu: ("cpu_defaults", "cpu_has_fast_bf16"),
        wandb_media: ("finish_wandb_run",),
        cli_errors: ("DATA_HINT", "check_config_files", "known_options", "_short_parse_error", "_user_error"),
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(cli, name) is getattr(module, name), name


def test_a_failed_run_leaves_no_empty_log_folder(kdl, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(RECIPES / "fashion_mnist/student.yaml")
    assert kdl("fit", "--config", recipe, "--data.init_args.root", "nowhere", "--trainer.default_root_dir", "run") == 2
    assert "'nowhere' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "lightning_logs").exists()


def test_a_fast_dev_run_teacher_is_named_in_the_missing_best_ckpt_message(
    kdl, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fast_dev_run writes last.ckpt but chooses no best.ckpt: the stage after it says why it finds none."""
    teacher = ["--config", str(RECIPES / "digits/teacher.yaml"), "--model.init_args.net", "tinynet"]
    assert kdl("fit", *teacher, "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", "t") == 0
    assert "fast_dev_run: a smoke test; no best.ckpt is chosen" in capsys.readouterr().err
    student = ["--config", str(RECIPES / "digits/blkd.yaml"), "--model.init_args.net", "tinynet"]
    assert (
        kdl("fit", *student, "--model.init_args.teacher", "t/checkpoints/best.ckpt", "--trainer.fast_dev_run", "1") == 2
    )
    err = capsys.readouterr().err
    assert "'t/checkpoints/best.ckpt' does not exist; only last.ckpt is in 't/checkpoints'" in err
    assert "fast_dev_run" in err
