"""``kdl check-data --config RECIPE.yaml``: is a recipe's dataset on disk, complete and readable?

Builds the recipe's DataModule (``data`` section; ``--data.init_args.root DIR`` and other ``--data.*``
overrides apply), sets up its train/validation and test splits, reads one image of each, and prints the split
sizes. A missing folder or file ends with the DataModule's own one-line message (exit status 2), which names
the path it looked for; docs/datasets.md says where each dataset comes from.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import yaml

from kd_lightning.errors import ConfigError, KDLError


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            content = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {path!r}: {e.strerror}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"--config {path!r} is not a YAML mapping")
    return content


def _data_section(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The ``data`` section of the stacked ``--config`` files, and the other arguments."""
    data: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        path = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None:
            rest.append(arg)
            i += 1
            continue
        i += 2 if not arg.startswith("--config=") else 1
        section = _load(path).get("data")
        if isinstance(section, str):  # a recipe may name its data section's own file (relative to the recipe)
            section = _load(os.path.join(os.path.dirname(path), section))
        if isinstance(section, dict):
            init = {**(data.get("init_args") or {}), **(section.get("init_args") or {})}
            data = {**data, **section, "init_args": init}
    return data, rest


def check(argv: list[str]) -> str:
    """Build, set up and read from the DataModule; return the summary line."""
    import lightning as L
    from jsonargparse import ArgumentError, ArgumentParser

    import kd_lightning.data  # noqa: F401 - registers the DataModules' short class names

    data, rest = _data_section(argv)
    if not data.get("class_path"):
        raise ConfigError("no data section with a class_path: pass --config RECIPE.yaml (a kdl fit recipe)")
    parser = ArgumentParser(prog="kdl check-data", exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    try:
        cfg = parser.parse_args(["--data", json.dumps(data), *rest])
        dm = parser.instantiate_classes(cfg).data
    except ArgumentError as e:
        from kd_lightning.cli_errors import _short_parse_error

        raise ConfigError(_short_parse_error(str(e))) from None
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    sizes = []
    for split in ("train", "val", "test"):
        dataset = getattr(dm, f"{split}_dataset", None)
        if dataset is None:
            continue
        sizes.append(f"{split} {len(dataset):,}")
        if len(dataset):
            dataset[0]  # decode one image: a damaged file shows here, not an hour into training
    facts = [f"{dm.num_classes} classes" if getattr(dm, "num_classes", None) else ""]
    if getattr(dm, "image_size", None):
        facts.append(f"{getattr(dm, 'in_channels', '?')}x{dm.image_size}x{dm.image_size} images")
    root = getattr(dm, "root", None)
    where = f" at {root}" if root else ""
    return f"{type(dm).__name__}{where}: {', '.join(sizes)}; " + ", ".join(f for f in facts if f)


def main(argv: list[str] | None = None) -> int:
    """``kdl check-data``: 0 when the data loads, 2 (with the reason) when it does not."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: kdl check-data --config RECIPE.yaml [--data.init_args.root DIR]")
        return 0 if argv else 2
    try:
        print(f"ok: {check(argv)}")
    except (KDLError, FileNotFoundError) as e:
        hint = (
            "\nwhere to get each dataset and its layout: docs/datasets.md" if isinstance(e, FileNotFoundError) else ""
        )
        print(f"kdl check-data: error: {e}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
