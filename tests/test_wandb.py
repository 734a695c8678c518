"""W&B for real, offline: a short kdl fit + test logs to W&B, and the run's own log is read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.callbacks.resume import flatten
from kd_lightning.wandb_offline import wait_for_offline_run
from tests.helpers import QUIET, RECIPES, cfg, cgankd_parts

FAST = [
    "--data.init_args.train_size",
    "200",
    "--trainer.max_epochs",
    "2",
    *QUIET,
]


@pytest.mark.filterwarnings("ignore")
def test_an_offline_run_logs_config_scalars_images_table_and_model(
    kdl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    student = str(RECIPES / "digits/student.yaml")
    assert (
        kdl("fit", "--config", student, "--model.init_args.net", "tinynet", *FAST, "--trainer.default_root_dir", "t")
        == 0
    )
    teacher = str(tmp_path / "t/checkpoints/best.ckpt")
    common = [
        "--config",
        str(RECIPES / "digits/blkd.yaml"),
        "--config",
        str(RECIPES / "fragments/wandb.yaml"),
        "--model.init_args.teacher",
        teacher,
        "--model.init_args.net",
        "tinynet",
        "--trainer.default_root_dir",
        "s",
        "--trainer.callbacks+=kd_lightning.callbacks.TemperatureScaling",
        *FAST,
    ]
    assert (
        kdl(
            "fit",
            *common,
            "--trainer.logger.init_args.save_dir",
            "wb_fit",
            "--trainer.logger.init_args.log_model",
            "true",
        )
        == 0
    )
    best = str(tmp_path / "s/checkpoints/best.ckpt")
    assert kdl("test", *common, "--trainer.logger.init_args.save_dir", "wb_test", "--ckpt_path", best) == 0

    fit = wait_for_offline_run(tmp_path / "wb_fit")
    # names and groups carry the method, the seed and the recipe, so W&B groups seeds
    assert fit.name == "DistillModule[BLKD]-seed0" and fit.group == "digits/blkd"
    assert set(fit.tags) == {"DistillModule[BLKD]", "seed0", "digits/blkd"}
    # the whole resolved recipe, the teacher's path included, equal to what kdl itself resolves
    logged = fit.config["kdl"]
    assert logged["model"]["init_args"]["teacher"] == teacher
    assert logged["model"]["init_args"]["kd_losses"][0]["init_args"] == {"T": 4.0, "weight": 0.9}
    assert logged["data"]["init_args"]["train_size"] == 200 and logged["seed_everything"] == 0
    saved = yaml.safe_load((tmp_path / "wb_fit/config.yaml").read_text())  # Lightning's copy, in the logger's dir
    flat_saved = flatten({k: saved[k] for k in ("model", "data", "trainer")})
    flat_logged = flatten({k: logged[k] for k in ("model", "data", "trainer")})
    assert len(flat_logged) > 100  # every recipe value, not only the model's hyper-parameters
    differing = {k: (v, flat_saved.get(k)) for k, v in flat_logged.items() if k in flat_saved and flat_saved[k] != v}
    assert not differing
    # scalars: one validation accuracy per epoch, in [0, 1]
    acc = fit.scalars("val/acc1")
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
    assert "train/kd/blkd_epoch" in fit.summary
    # the checkpoint as a model artifact
    assert any(a["type"] == "model" and "model.ckpt" in a["files"] for a in fit.artifacts)

    test = wait_for_offline_run(tmp_path / "wb_test")
    assert 0.0 <= test.summary["test/acc1"] <= 1.0
    images = [row["test/reliability"] for row in test.history if "test/reliability" in row]
    assert images and images[0]["_type"] == "images/separated"
    assert list((test.path / "files" / "media" / "images").glob("test/reliability*.png"))
    tables = [row["test/per_class_accuracy"] for row in test.history if "test/per_class_accuracy" in row]
    assert tables and tables[0]["_type"] == "table-file" and tables[0]["nrows"] == 10
    rows = (tmp_path / "wb_test/per_class_accuracy.csv").read_text().splitlines()
    assert rows[0] == "class,accuracy,n" and len(rows) == 11


@pytest.mark.filterwarnings("ignore")
def test_a_student_on_a_store_shows_the_filter_histograms(kdl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cGAN-KD's M3 with the W&B fragment: the store's filter histograms are an image of the run."""
    from kd_lightning.sampling.generate import generate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = tmp_path / "store"
    (tmp_path / "parts").mkdir()
    generate(cfg(cgankd_parts(tmp_path / "parts"), store))
    assert (store / "filter_hist.png").is_file()
    args = [
        "--config",
        str(RECIPES / "cgankd/digits/student_cgankd.yaml"),
        "--config",
        str(RECIPES / "fragments/wandb.yaml"),
    ]
    args += ["--data.init_args.store", str(store), "--model.init_args.net_weights", "null", "--model.init_args.net"]
    args += [
        "tinynet",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    # an absolute save_dir: wandb's background service, started by the test before in another folder, would
    # resolve a relative one against its own working directory
    args += ["--trainer.default_root_dir", "s", "--trainer.logger.init_args.save_dir", str(tmp_path / "wb"), *QUIET]
    assert kdl("fit", *args) == 0
    # W&B's service writes the run's log in its own process, after kdl has finished the run: read it once closed
    # (it had 0 history rows when read at once on a loaded machine)
    run = wait_for_offline_run(tmp_path / "wb")
    shown = [row["store/filter_hist"] for row in run.history if "store/filter_hist" in row]
    logged = sorted({key for row in run.history for key in row})
    assert shown and shown[0]["_type"] == "images/separated", f"{run.path} logged {len(run.history)} rows: {logged}"
    assert list((run.path / "files" / "media" / "images").glob("store/filter_hist*.png"))


def test_a_wandb_run_is_set_up_without_warnings_about_settings_kdl_chose(
    kdl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B warns "anonymous setting has no effect" when Lightning passes ``anonymous=None``, and "git root ...
    does not exist" when its save_dir is not there yet: kdl drops the one and creates the other before the run."""
    from kd_lightning.cli import build_cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--config", str(RECIPES / "digits/student.yaml"), "--config", str(RECIPES / "fragments/wandb.yaml")]
    cli = build_cli([*args, "--trainer.default_root_dir", "run", "--seed_everything", "0"], run=False)
    (logger,) = [lg for lg in cli.trainer.loggers if type(lg).__name__ == "WandbLogger"]
    assert "anonymous" not in logger._wandb_init
    assert Path(logger._wandb_init["dir"]).is_dir() and Path(logger._wandb_init["dir"]) == tmp_path / "run"
    import wandb

    wandb.finish()
