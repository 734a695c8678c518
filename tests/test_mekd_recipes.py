"""Every recipe under recipes/mekd/fashion_mnist runs (fake Fashion-MNIST files, a tiny teacher, short runs).

The stages run in order as a user would: the cloud teacher, both deprivatization GANs, then each student recipe
under fast_dev_run against the in-process teacher (the recipe's checkpoint path) and MEKD against a live loopback
server (the teacher given as a URL, with a token).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_lightning.serve.service import read_server_log
from tests.blackbox_helpers import serve_in_thread
from tests.helpers import QUIET, RECIPES, make_fake_mnist

DIR = RECIPES / "mekd" / "fashion_mnist"
EDGE = ["--data.init_args.edge_size", "40", "--data.init_args.edge_val_size", "20", "--data.init_args.root", "fm"]
LOCAL = [a.replace("--data.init_args.", "--data.init_args.local.init_args.") for a in EDGE]
STUDENTS = ["mekd_soft", "mekd_hard", "kd_soft", "kd_hard", "ml_soft", "dkd_soft"]


def test_every_mekd_recipe_is_exercised() -> None:
    shipped = {p.stem for p in DIR.glob("*.yaml")}
    assert shipped == {"teacher", "deprivatize_soft", "deprivatize_hard", "reference_true_labels", *STUDENTS}


def test_mekd_stages_run_in_order_locally_and_against_a_live_server(kdl, tmp_path: Path) -> None:  # noqa: ANN001
    make_fake_mnist(tmp_path / "fm", n_train=200, n_test=40)
    teacher = [
        "--model.init_args.net",
        "tinynet",
        "--trainer.max_epochs",
        "1",
        *QUIET,
    ]
    assert kdl("fit", "--config", str(DIR / "teacher.yaml"), *teacher, *EDGE) == 0
    ckpt = tmp_path / "runs/mekd/fashion_mnist/teacher/checkpoints/best.ckpt"
    assert ckpt.is_file()
    for r in ("soft", "hard"):
        gan = ["--trainer.max_steps", "4", "--model.init_args.im_interval", "1", "--model.init_args.im_batch_size", "4"]
        assert kdl("fit", "--config", str(DIR / f"deprivatize_{r}.yaml"), *gan, *EDGE) == 0
        assert (tmp_path / f"runs/mekd/fashion_mnist/deprivatize_{r}/checkpoints/last.ckpt").is_file()
    assert kdl("fit", "--config", str(DIR / "reference_true_labels.yaml"), "--trainer.fast_dev_run", "1", *EDGE) == 0
    for name in STUDENTS:
        args = ["--trainer.fast_dev_run", "1", "--data.init_args.pool_size", "40", *LOCAL]
        assert kdl("fit", "--config", str(DIR / f"{name}.yaml"), *args) == 0, name
        stats = (tmp_path / f"runs/mekd/fashion_mnist/{name}/queries/stats.json").read_text()
        assert '"journal_spent": 40' in stats or '"journal_spent": 3' in stats, (name, stats)  # views may repeat
    log = tmp_path / "server.log"
    with serve_in_thread(ckpt, log, "soft", token="tok") as url:
        args = ["--trainer.fast_dev_run", "1", "--data.init_args.pool_size", "40", *LOCAL]
        args += ["--model.init_args.teacher", url, "--model.init_args.token", "tok"]
        args += ["--trainer.default_root_dir", "runs/mekd_url"]
        assert kdl("fit", "--config", str(DIR / "mekd_soft.yaml"), *args) == 0
    assert sum(r["n"] for r in read_server_log(log) if r["charged"]) == 40


@pytest.mark.parametrize("name", STUDENTS)
def test_student_recipes_name_a_budget_equal_to_their_pool(name: str) -> None:
    import yaml

    cfg = yaml.safe_load((DIR / f"{name}.yaml").read_text())
    assert cfg["model"]["init_args"]["query_budget"] == cfg["data"]["init_args"]["pool_size"]
    assert "label" not in str(cfg["data"]["init_args"]["pool"])
