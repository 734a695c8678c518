"""One flag convention for every kdl command (kd_lightning.flags): underscores, booleans as bare flags that also
take true/false, the older dash spellings still accepted."""

from __future__ import annotations

import pytest

from kd_lightning.flags import normalize, parse_bool
from tests.helpers import REPO


def test_normalize_gives_every_boolean_a_value_and_the_canonical_name() -> None:
    bools = ["--dry_run", "--force"]
    assert normalize(["f.yaml", "--dry_run"], bools) == ["f.yaml", "--dry_run=true"]
    assert normalize(["--dry-run", "f.yaml"], bools) == ["--dry_run=true", "f.yaml"]  # a file is not a bool value
    assert normalize(["--dry_run", "false", "--force", "True"], bools) == ["--dry_run=false", "--force=True"]
    assert normalize(["--dry-run=no", "--count", "3"], bools) == ["--dry_run=no", "--count", "3"]
    assert normalize(["--", "--dry-run"], bools) == ["--", "--dry-run"]
    assert parse_bool("Yes") is True and parse_bool("0") is False
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        parse_bool("maybe")


@pytest.mark.parametrize("flags", [["--dry_run"], ["--dry-run"], ["--dry_run", "true"], ["--dry-run", "true"]])
def test_pipeline_dry_run_in_every_spelling(kdl, capsys, monkeypatch, flags: list[str]) -> None:
    monkeypatch.chdir(REPO)  # the pipeline names its recipes relative to the repository
    assert kdl("pipeline", "--config", "recipes/cgankd/digits/pipeline.yaml", *flags, "--force") == 0
    assert "$ kdl fit --config recipes/cgankd/digits/teacher.yaml" in capsys.readouterr().out


def test_sample_serve_and_generate_parsers_follow_the_convention() -> None:
    from kd_lightning.sample import build_parser as sample_parser
    from kd_lightning.sampling.generate import BOOL_OPTIONS
    from kd_lightning.serve.server import build_parser as serve_parser

    args = sample_parser().parse_args(["--ckpt", "g.ckpt", "--out", "o.pt", "--raw", "--no_progress", "false"])
    assert args.raw is True and args.no_progress is False
    assert sample_parser().parse_args(["--ckpt", "g", "--out", "o", "--no_progress"]).no_progress is True
    for spelling in ("--max_batch", "--max-batch"):
        assert serve_parser().parse_args(["--ckpt", "t.ckpt", spelling, "7"]).max_batch == 7
    assert serve_parser().parse_args(["--ckpt", "t", "--max_body_mb", "2"]).max_body_mb == 2.0
    assert {"--quiet", "--keep_rejected", "--progress", "--filter"} <= set(BOOL_OPTIONS)
    assert normalize(["--keep_rejected", "--quiet", "false"], BOOL_OPTIONS) == ["--keep_rejected=true", "--quiet=false"]
