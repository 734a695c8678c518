"""``kdl``: Lightning's CLI for kd_lightning recipes.

``kdl fit|validate|test|predict --config RECIPE.yaml [--config MORE.yaml] [--key value ...]``.
The DataModule's facts (classes, channels, image size, normalisation, label range) are linked
into the model, a checkpoint callback keeps ``last.ckpt`` and the best checkpoint on the model's
validation metric under ``<default_root_dir>/checkpoints``, and user errors end with one short
message (set ``KDL_DEBUG=1`` or pass ``--debug`` for the traceback).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import kd_lightning.data  # noqa: F401  (register DataModules for short class names)
import kd_lightning.methods  # noqa: F401  (register LightningModules for short class names)
from kd_lightning.errors import KDLError

#: DataModule attributes that kdl passes on to the model's constructor arguments of the same name
LINKED_DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std", "label_range")


class KDCheckpoint(ModelCheckpoint):
    """``last.ckpt`` plus the best checkpoint (``best.ckpt``) on the model's own metric.

    ``monitor``/``mode`` default to the model's ``monitor``/``monitor_mode`` attributes (e.g.
    ``val/acc1``/max for classifiers, ``val/mae``/min for regressors); ``dirpath`` defaults to
    ``<trainer.default_root_dir>/checkpoints``, a stable place that later stages can name.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "best", monitor: str | None = None,
                 mode: str | None = None, save_last: bool = True, save_top_k: int = 1, **kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode or "min",
                         save_last=save_last, save_top_k=save_top_k, auto_insert_metric_name=False, **kwargs)
        self._mode_given = mode is not None

    def bind(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        """Fill in defaults from the trainer and the model (called by kdl before the run)."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        if self.monitor is None and getattr(model, "monitor", None):
            self.monitor = model.monitor
            if not self._mode_given:
                mode = getattr(model, "monitor_mode", "min")
                self.mode, self.kth_value = mode, torch.tensor(torch.inf if mode == "min" else -torch.inf)


def cpu_defaults() -> None:
    """Use every core the process may run on (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX tiles for bf16 (plain AVX-512 bf16 autocast measured ~15x slower here)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


class KDLCLI(LightningCLI):
    """LightningCLI with kd_lightning's links, checkpoint defaults and CPU checks."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(KDCheckpoint, "checkpoint")
        for key in LINKED_DATA_FACTS:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = cfg.get("trainer", {}) or {}
        precision, accelerator = str(trainer.get("precision") or ""), str(trainer.get("accelerator") or "auto")
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        if "bf16" in precision and on_cpu and not cpu_has_fast_bf16():
            warnings.warn(
                f"trainer.precision={precision!r} on a CPU without AMX: bf16 autocast was measured ~15x slower "
                "than fp32 on such CPUs; use precision 32 here and bf16-mixed on GPUs", stacklevel=1)

    def after_instantiate_classes(self) -> None:
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, KDCheckpoint):
                cb.bind(self.trainer, self.model)


def build_cli(args: list[str] | None = None, run: bool = True) -> KDLCLI:
    """Construct (and by default run) the kdl CLI on ``args``; used by ``main`` and tests."""
    return KDLCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def _quiet_lightning() -> None:
    for msg in (".*tensorboardX.*", ".*litlogger.*", ".*does not have many workers.*", ".*LitLogger.*"):
        warnings.filterwarnings("ignore", message=msg)
    os.environ.setdefault("LIGHTNING_DISABLE_TIPS", "1")


def main(args: list[str] | None = None) -> int:
    """Entry point of ``kdl``; returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get("KDL_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    _quiet_lightning()
    cpu_defaults()
    try:
        build_cli(argv)
    except (KDLError, MisconfigurationException, FileNotFoundError) as e:
        if debug:
            raise
        print(f"kdl: error: {e}\n(set KDL_DEBUG=1 or pass --debug for the full traceback)", file=sys.stderr)
        return 2
    return 0


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
