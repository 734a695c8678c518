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
STUDENTS = ["mekd_soft", "mekd_hard", "kd_soft", "kd_hard", "ml_soft", "dkd_soft", "kd_gz"]


def test_every_mekd_recipe_is_exercised() -> None:
    shipped = {p.stem for p in DIR.glob("*.yaml")} - {"pipeline"}  # the chain: test_the_mekd_pipeline_...
    shipped -= {"kn", "kn_adaptive", "al", "dafl", "am", "db3kd"}  # compared methods: test_blackbox_baselines.py
    stages = {"teacher", "deprivatize", "gate", "deprivatize_soft", "deprivatize_hard", "reference_true_labels"}
    assert shipped == stages | set(STUDENTS)


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
    # the official layout with the paper's L_IM weighting (64 queries per generator step), then its gate
    assert kdl("fit", "--config", str(DIR / "deprivatize.yaml"), "--trainer.max_steps", "4", *EDGE) == 0
    official = tmp_path / "runs/mekd/fashion_mnist/deprivatize"
    assert '"journal_spent": 80' in (official / "queries/stats.json").read_text()  # 2 generator steps x all 40
    gate = ["--config", str(DIR / "gate.yaml"), "--ckpt_path", str(official / "checkpoints/last.ckpt")]
    gate += ["--trainer.default_root_dir", "runs/gate", "--trainer.callbacks.init_args.samples", "50", *EDGE]
    ok = ["--trainer.callbacks.init_args.min_class_share", "0", "--trainer.callbacks.init_args.min_entropy", "0"]
    assert kdl("test", "--config", str(DIR / "deprivatize.yaml"), *gate, *ok) == 0
    assert (tmp_path / "runs/gate/gate.json").is_file()
    strict = ["--trainer.callbacks.init_args.min_class_share", "0.5"]  # ten classes cannot each hold half
    assert kdl("test", "--config", str(DIR / "deprivatize.yaml"), *gate, *strict) == 2
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


def test_the_mekd_pipeline_dry_run_shows_every_arm_on_one_budget_and_schedule(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from kd_lightning import pipeline

    args = ["--config", str(DIR / "pipeline.yaml"), "--dry-run", "--vars.root", str(tmp_path), "--vars.budget", "50000"]
    assert pipeline.main(args) == 0
    out = capsys.readouterr().out
    arms = ["mekd_soft_tau2", "mekd_soft_tau", "mekd_hard", "kd_gz", "kd_soft", "ce_hard", "reference"]
    for name in ["teacher", "api_soft", "api_hard", "deprivatize", "gate", *arms, *(f"test_{a}" for a in arms)]:
        assert f"] {name} " in out, name
    fits = [ln for ln in out.splitlines() if ln.strip().startswith("$ kdl fit") and "/b50000/" in ln]
    assert len(fits) == 6 and all("--trainer.max_steps 2500" in ln and "--query_budget" not in ln for ln in fits)
    assert all("--model.init_args.query_budget 50000" in ln for ln in fits)
    assert sum("spent_before" in ln for ln in fits) == 4  # the G(z) arms pay for stage 1's queries
    assert "recipes/mekd/fashion_mnist/gate.yaml" in out and "--responses hard" in out


@pytest.mark.slow
def test_the_mekd_pipeline_runs_end_to_end_stops_at_the_gate_and_keeps_one_budget(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    """The shipped pipeline at toy sizes (vars and fake data only): two served APIs, stage 1, the gate (failing,
    then passing), every stage-2 arm and its test; every query the APIs charged is in exactly one journal."""
    import json

    import yaml

    from kd_lightning import pipeline, report
    from tests.blackbox_helpers import free_port

    make_fake_mnist(tmp_path / "fm", n_train=200, n_test=40)
    raw = yaml.safe_load((DIR / "pipeline.yaml").read_text())
    for stage in raw["stages"]:
        if stage["command"] == "serve-teacher":
            continue
        configs = stage["config"] if isinstance(stage["config"], list) else [stage["config"]]
        stage["config"] = [str(RECIPES.parent / c) for c in configs]
        data = yaml.safe_load(Path(stage["config"][0]).read_text())["data"]["class_path"]
        toy = LOCAL if data == "QueryPoolDataModule" else EDGE
        extra = {k.removeprefix("--"): v for k, v in zip(toy[::2], toy[1::2], strict=True)}
        if stage["name"] == "teacher":
            extra["model.init_args.net"] = "tinynet"
        if stage["command"] == "fit" and stage["name"] not in ("teacher", "deprivatize"):
            extra["trainer.limit_val_batches"] = 1
        stage["args"] = {**stage.get("args", {}), **extra}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    toy_vars = dict(root="runs", port_soft=free_port(), port_hard=free_port(), teacher_epochs=1, gan_steps=4,
                    im_interval=1, im_batch=4, im_budget=40, gate_samples=30, steps=4, val_every=2, batch=16,
                    budget=40)  # fmt: skip
    args = ["--config", "pipe.yaml", *(f"--vars.{k}={v}" for k, v in toy_vars.items())]
    # a gate no generator can pass (ten classes cannot each hold half of the answers) stops the pipeline
    assert pipeline.main([*args, "--vars.gate_min_class_share", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "stage 'gate' failed" in err and "generator gate FAILED: class share below 0.5" in err
    assert not (tmp_path / "runs/seed0/b40").exists()  # no stage-2 arm ran
    ok = ["--vars.gate_min_class_share", "0", "--vars.gate_min_entropy", "0"]
    assert pipeline.main([*args, *ok]) == 0
    spent = {}
    for stats in tmp_path.glob("runs/**/queries/stats.json"):
        spent[stats.parent.parent.name] = json.loads(stats.read_text())
    assert spent["deprivatize"]["journal_spent"] == 8  # 2 generator steps x 4 images
    assert spent["gate"]["journal_spent"] == 30 + 3 * 10  # the gate's samples + G(one-hot) for 3 hard scales
    arms = ("mekd_soft_tau2", "mekd_soft_tau", "mekd_hard", "kd_gz", "kd_soft", "ce_hard")
    for arm in arms[:4]:  # G(z) arms: the budget minus stage 1's queries, the pool walked whole
        assert spent[arm]["journal_spent"] == spent[arm]["query_budget"] == 40 - 8, arm
        assert spent[arm]["spent_before"] == 8
    for arm in arms[4:]:
        assert 0 < spent[arm]["journal_spent"] <= spent[arm]["query_budget"] == 40
    for api, names in (("api_soft", ("deprivatize", "gate", *arms[:2], "kd_gz", "kd_soft")),
                       ("api_hard", ("mekd_hard", "ce_hard"))):  # fmt: skip
        served = read_server_log(tmp_path / f"runs/{api}/server.jsonl")
        assert sum(r["n"] for r in served if r["charged"]) == sum(spent[n]["journal_spent"] for n in names), api
    for arm in (*arms, "reference"):
        log = next(tmp_path.glob(f"runs/seed0/**/{arm}/pipeline/test_{arm}.log")).read_text()
        assert "test/acc1" in log, arm
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs/seed0/gate"), "--quiet", "true"]) == 0
    assert "test/gate_entropy" in capsys.readouterr().out
    # again: everything is done, so no server even starts
    assert pipeline.main([*args, *ok]) == 0
    served = read_server_log(tmp_path / "runs/api_soft/server.jsonl")
    assert sum(r["n"] for r in served if r["charged"]) == sum(
        spent[n]["journal_spent"] for n in ("deprivatize", "gate", *arms[:2], "kd_gz", "kd_soft")
    )
