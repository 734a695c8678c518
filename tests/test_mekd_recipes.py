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
    shipped = {p.stem for p in DIR.glob("*.yaml")} - {"pipeline"}  # the chain: test_the_mekd_pipeline_...
    shipped -= {"kn", "al", "dafl", "am", "db3kd"}  # the compared methods: tests/test_blackbox_baselines.py
    assert shipped == {"teacher", "deprivatize_soft", "deprivatize_hard", "reference_true_labels", *STUDENTS}


def test_mekd_stages_run_in_order_locally_and_against_a_live_server(kdl, tmp_path: Path) -> None:
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


@pytest.mark.slow
def test_the_mekd_pipeline_serves_its_teacher_and_pays_each_query_once(tmp_path: Path, monkeypatch) -> None:
    """The shipped pipeline at toy sizes: teacher, the API as a background stage, both MEKD stages through it."""
    import yaml

    from kd_lightning import pipeline
    from tests.blackbox_helpers import free_port

    make_fake_mnist(tmp_path / "fm", n_train=200, n_test=40)
    toy = {  # stage -> extra arguments (toy sizes, fake data); the shipped wiring is kept as it is
        "teacher": ["--model.init_args.net", "tinynet", "--trainer.max_epochs", "1", *EDGE],
        "deprivatize": [
            "--trainer.max_steps",
            "4",
            "--model.init_args.im_interval",
            "1",
            "--model.init_args.im_batch_size",
            "4",
            *EDGE,
        ],
        "mekd": [
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--data.init_args.pool_size",
            "40",
            *LOCAL,
        ],
    }
    toy["test_mekd"] = toy["mekd"]
    raw = yaml.safe_load((DIR / "pipeline.yaml").read_text())
    for stage in raw["stages"]:
        if "config" in stage:
            stage["config"] = str(RECIPES.parent / stage["config"])
        if stage["name"] in toy:
            args = stage.get("args") or {}
            extra = dict(zip(toy[stage["name"]][::2], toy[stage["name"]][1::2], strict=True))
            stage["args"] = {**args, **{k.removeprefix("--"): v for k, v in extra.items()}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--config", "pipe.yaml", "--vars.root", "runs", "--vars.port", str(free_port())]
    assert pipeline.main(args) == 0
    served = read_server_log(tmp_path / "runs/teacher_api_soft/server.jsonl")
    charged = sum(r["n"] for r in served if r["charged"])
    import json

    spent = [
        json.loads((tmp_path / f"runs/{s}_soft/seed0/queries/stats.json").read_text())["journal_spent"]
        for s in ("deprivatize", "mekd")
    ]
    assert charged == sum(spent) > 0  # every answer the API charged is in a stage's journal, none twice
    assert "test/acc1" in (tmp_path / "runs/mekd_soft/seed0/pipeline/test_mekd.log").read_text()
    # again: everything is done, so the server is not even started
    assert pipeline.main(args) == 0
    assert sum(r["n"] for r in read_server_log(tmp_path / "runs/teacher_api_soft/server.jsonl") if r["charged"]) == (
        charged
    )
