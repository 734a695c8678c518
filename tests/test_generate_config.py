"""``kdl generate``'s settings: the checks that need no checkpoint fail when the config is built (no files read)."""

from __future__ import annotations

import pytest

from kd_lightning.errors import ConfigError
from kd_lightning.sampling.generate import GenerateConfig as FromGenerate
from kd_lightning.sampling.generate_config import GenerateConfig

NO_FILE = "/nonexistent/g.ckpt"  # never opened: these checks come before any checkpoint is loaded


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size=0; expected a positive integer"),
        ({"shard_size": -1}, "shard_size=-1; expected a positive integer"),
        ({"burn_in": 0}, "burn_in=0; expected a positive integer"),
        ({"subsample": True, "filter": False}, "subsample=true needs density_ratio="),
        ({}, "filter=true needs teacher=<checkpoint>; set filter false"),
        ({"filter": False, "replace": True}, "replace=true needs teacher=<checkpoint>"),
        ({"teacher": NO_FILE, "rho": 1.5}, r"rho=1.5; expected a quantile in \(0, 1\]"),
        ({"teacher": NO_FILE, "rho": 0.0}, r"rho=0.0; expected a quantile in \(0, 1\]"),
        ({"filter": False, "kappa": -0.1}, "kappa=-0.1; expected a value >= 0"),
        ({"filter": False, "compile": True}, "compile=true compiles the fast_inference copies"),
    ],
)
def test_settings_that_need_no_checkpoint_are_checked_when_built(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(generator=NO_FILE, out="/tmp/unused", **kwargs)


def test_good_settings_build_and_the_old_import_path_is_the_same_class() -> None:
    cfg = GenerateConfig(
        generator=NO_FILE, out="/tmp/unused", teacher=NO_FILE, rho=1.0, fast_inference=True, compile=True
    )
    assert cfg.replace is None and cfg.subsample is None  # resolved by Generation from the GAN's task
    assert FromGenerate is GenerateConfig
