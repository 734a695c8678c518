"""Stage values and stage runs that ``kdl pipeline`` must hand over intact: a ``{class_path: ...}`` mapping as an
override, and a test stage in the folder of the fit it tests (the fit's ``config.yaml`` stays the fit's)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from kd_lightning.cli import main as kdl_main
from kd_lightning.pipeline import load, main
from tests.test_pipeline import RECIPES, lines, use_fake_kdl

SCHEDULER = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3, "gamma": 0.5}}


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return use_fake_kdl(tmp_path, monkeypatch)


def _pipeline(path: Path) -> None:
    stage = {
        "name": "s",
        "command": "fit",
        "config": str(RECIPES / "digits/student.yaml"),
        "dir": "runs/s",
        "args": {"model.init_args.lr_scheduler": SCHEDULER, "trainer.max_epochs": 1},
    }
    path.write_text(yaml.safe_dump({"stages": [stage]}))


def test_a_class_path_mapping_is_passed_as_the_json_kdl_reads(fake, capsys) -> None:
    _pipeline(Path("p.yaml"))
    steps, _ = load(["--config", "p.yaml"])
    argv = steps[0].argv
    token = argv[argv.index("--model.init_args.lr_scheduler") + 1]
    assert json.loads(token) == SCHEDULER  # the mapping as written: no defaults filled in, nothing imported
    assert steps[0].spec["config"]["model"]["init_args"]["lr_scheduler"] == SCHEDULER
    assert main(["--config", "p.yaml"]) == 0
    assert lines(capsys.readouterr().out) == {"s": "done"}
    assert '"lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"gamma": 0.5' in (
        Path("runs/s/pipeline/s.log").read_text()
    )
    # and kdl itself parses the command line the pipeline runs (--print_config: nothing is trained)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as done:
        kdl_main(["fit", *argv, "--print_config"])
    assert done.value.code in (0, None)
    scheduler = yaml.safe_load(printed.getvalue())["model"]["init_args"]["lr_scheduler"]
    assert scheduler["class_path"] == SCHEDULER["class_path"] and scheduler["init_args"]["step_size"] == 3


def test_a_class_path_variable_is_kept_as_a_mapping_too(fake, capsys) -> None:
    Path("p.yaml").write_text(
        yaml.safe_dump(
            {
                "vars": {"sched": SCHEDULER},
                "stages": [
                    {"name": "s", "command": "fit", "config": "recipe.yaml", "dir": "r", "args": {"m.s": "${sched}"}}
                ],
            }
        )
    )
    steps, _ = load(["--config", "p.yaml"])
    assert json.loads(steps[0].argv[steps[0].argv.index("--m.s") + 1]) == SCHEDULER


def test_a_test_stage_never_overwrites_the_config_of_the_fit_it_tests(tmp_path: Path, monkeypatch) -> None:
    """Without a logger both runs save their config into the run folder itself: the test saves config.test.yaml."""
    monkeypatch.chdir(tmp_path)
    recipe = str(RECIPES / "digits/student.yaml")
    common = ["--config", recipe, "--trainer.default_root_dir", "run", "--trainer.logger", "false"]
    small = ["--model.init_args.net", "tinynet", "--data.init_args.train_size", "100"]
    small += ["--trainer.enable_progress_bar", "false"]
    fit = ["fit", *common, *small, "--trainer.max_epochs", "1"]
    assert kdl_main(fit) == 0
    fit_config = Path("run/config.yaml").read_text()
    test = ["test", *common, *small, "--ckpt_path", "run/checkpoints/last.ckpt"]
    assert kdl_main(test) == 0
    assert Path("run/config.yaml").read_text() == fit_config  # the fit's, untouched
    tested = yaml.safe_load(Path("run/config.test.yaml").read_text())
    assert tested["ckpt_path"] == "run/checkpoints/last.ckpt"
    assert kdl_main(test) == 0  # a second test replaces its own file, still not the fit's
    assert Path("run/config.yaml").read_text() == fit_config
