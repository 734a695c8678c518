"""``kdl``: Lightning's CLI for kd_lightning recipes.

``kdl fit|validate|test|predict --config RECIPE.yaml [--config MORE.yaml] [--key value ...]``;
``kdl sample --ckpt GAN.ckpt ...`` writes GAN samples (:mod:`kd_lightning.sample`).
The DataModule's facts (classes, channels, image size, normalisation, label range) are linked
into the model, a checkpoint callback keeps ``last.ckpt`` and the best checkpoint on the model's
validation metric under ``<default_root_dir>/checkpoints``, and user errors end with one short
message (set ``KDL_DEBUG=1`` or pass ``--debug`` for the traceback).

Every ``fit`` also gets the callbacks of :mod:`kd_lightning.callbacks`: exact resumption
(``--ckpt_path last`` continues mid-epoch with the same data order and RNG states), SIGTERM handling
(finish the step, write ``last.ckpt``, exit 143), a NaN guard, and atomic checkpoint writes. Resuming
with a recipe whose model or data differ from the checkpoint's is refused, listing the differing keys,
unless ``--allow_resume_mismatch true`` is passed.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
import warnings
from typing import Any

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import kd_lightning.data  # noqa: F401  (register DataModules for short class names)
import kd_lightning.methods  # noqa: F401  (register LightningModules for short class names)
from kd_lightning.callbacks import (
    EXIT_SIGTERM,
    AtomicCheckpointIO,
    GracefulStop,
    NaNGuard,
    ResumeState,
    config_differences,
)
from kd_lightning.errors import CheckpointError, ConfigError, KDLError
from kd_lightning.losses.simkd import HEAD_KEY

#: DataModule attributes that kdl passes on to the model's constructor arguments of the same name
LINKED_DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std", "label_range")


class KDCheckpoint(ModelCheckpoint):
    """``last.ckpt`` plus the best checkpoint (``best.ckpt``) on the model's own metric.

    ``monitor``/``mode`` default to the model's ``monitor``/``monitor_mode`` attributes (e.g.
    ``val/acc1``/max for classifiers, ``val/mae``/min for regressors); ``dirpath`` defaults to
    ``<trainer.default_root_dir>/checkpoints``, a stable place that later stages can name.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best",
        monitor: str | None = None,
        mode: str | None = None,
        save_last: bool = True,
        save_top_k: int = 1,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode or "min",
            save_last=save_last,
            save_top_k=save_top_k,
            auto_insert_metric_name=False,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self._mode_given = mode is not None
        self._last_saved_at: int | None = None

    # Lightning >= 2.5 writes last.ckpt only when a top-k checkpoint is written; resuming needs the
    # latest state, so last.ckpt is (also) written at every validation / epoch-end save point.
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        self._last_saved_at = trainer.global_step
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _would_save_last(self, trainer: L.Trainer, on_train_epoch_end: bool) -> bool:
        return (
            bool(self.save_last)
            and not self._should_skip_saving_checkpoint(trainer)
            and (self._should_save_on_train_epoch_end(trainer) == on_train_epoch_end)
        )

    def _ensure_last(self, trainer: L.Trainer, eligible: bool) -> None:
        if eligible and self._last_saved_at != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        eligible = self._would_save_last(trainer, on_train_epoch_end=False)
        super().on_validation_end(trainer, pl_module)
        self._ensure_last(trainer, eligible)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        eligible = self._would_save_last(trainer, on_train_epoch_end=True)
        super().on_train_epoch_end(trainer, pl_module)
        self._ensure_last(trainer, eligible)

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
        parser.add_lightning_class_args(GracefulStop, "graceful_stop")
        parser.add_lightning_class_args(NaNGuard, "nan_guard")
        parser.add_argument(
            "--allow_resume_mismatch",
            type=bool,
            default=False,
            help="resume even when the recipe's model/data differ from the checkpoint's",
        )
        for key in LINKED_DATA_FACTS:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the model's hyper-parameters from --ckpt_path; a bad file is the user's error
        try:
            if not self._keeps_recipe_model():
                super()._parse_ckpt_path()
        except Exception as e:  # noqa: BLE001
            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            raise CheckpointError(
                f"checkpoint {path!r} cannot be read as a kdl checkpoint "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e

    def _keeps_recipe_model(self) -> bool:
        """True for test/validate/predict of a student that carries its own head, with another model's recipe.

        Lightning rebuilds the model a checkpoint names (for a distilled student: its ``DistillModule``, which
        loads the teacher). A student with a replaced head (SimKD) is complete without its teacher, so
        ``kdl test --config <plain student recipe> --ckpt_path <SimKD student>`` keeps the recipe's model,
        which takes the head from the checkpoint (``NetTask.on_load_checkpoint``).
        """
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub and sub != "fit" else None
        if not path or not os.path.isfile(str(path)):
            return False
        ckpt = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        if not isinstance(ckpt, dict) or HEAD_KEY not in ckpt:
            return False
        saved = ckpt.get("hyper_parameters", {}).get("_class_path")
        ours = getattr(self.config[sub].get("model"), "class_path", None)
        return bool(saved and ours and saved != ours)

    def before_instantiate_classes(self) -> None:
        trainer = self._subcommand_config().get("trainer", {}) or {}
        precision, accelerator = str(trainer.get("precision") or ""), str(trainer.get("accelerator") or "auto")
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        if "bf16" in precision and on_cpu and not cpu_has_fast_bf16():
            warnings.warn(
                f"trainer.precision={precision!r} on a CPU without AMX: bf16 autocast was measured ~15x slower "
                "than fp32 on such CPUs; use precision 32 here and bf16-mixed on GPUs",
                stacklevel=1,
            )

    def _subcommand_config(self) -> Any:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def recipe(self) -> dict[str, Any]:
        """The model and data sections of the resolved recipe, as plain values (stored in checkpoints)."""
        cfg = self._subcommand_config()
        return {key: _plain(cfg.get(key)) for key in ("model", "data")}

    def after_instantiate_classes(self) -> None:
        trainer = self.trainer
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, KDCheckpoint):
                cb.bind(trainer, self.model)
        if not any(isinstance(cb, ResumeState) for cb in trainer.callbacks):  # type: ignore[attr-defined]
            trainer.callbacks.insert(0, ResumeState(self.recipe()))  # type: ignore[attr-defined]
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def before_fit(self) -> None:
        """Refuse to resume from a checkpoint whose recipe (model/data) differs from this one."""
        cfg = self._subcommand_config()
        path = resolve_ckpt_path(cfg.get("ckpt_path"), self.trainer)
        if path is None or cfg.get("allow_resume_mismatch"):
            return
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from None
        saved = ckpt.get("kdl_config") if isinstance(ckpt, dict) else None
        if saved is None:
            return
        diffs = config_differences(saved, self.recipe())
        if diffs:
            lines = "\n".join(f"  {k}: checkpoint={a!r} now={b!r}" for k, a, b in diffs)
            raise ConfigError(
                f"refusing to resume from {path!r}: the recipe differs from the checkpoint's in "
                f"{len(diffs)} key(s):\n{lines}\npass --allow_resume_mismatch true to resume anyway"
            )


def resolve_ckpt_path(ckpt_path: Any, trainer: L.Trainer) -> str | None:
    """The file a ``fit`` would resume from: ``last`` is the newest ``last*.ckpt`` of the checkpoint folders."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path == "last":
        found = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                found += glob.glob(os.path.join(str(cb.dirpath), f"{cb.CHECKPOINT_NAME_LAST}*{cb.FILE_EXTENSION}"))
        return max(found, key=os.path.getmtime) if found else None
    return str(ckpt_path) if os.path.isfile(str(ckpt_path)) else None


def _plain(value: Any) -> Any:
    """A config value as dicts/lists of primitives (functions and classes by their dotted name)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


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
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
    )


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning() -> None:
    """Silence advice that is noise for kdl users (cloud-logger tips, the tensorboardX notice)."""
    for msg in (".*tensorboardX.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=msg)
    logging.getLogger("lightning.pytorch").addFilter(_DropTips())
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(_DropTips())


_NOISE = (
    r"Expected a <class 'NoneType'>|^Given value|NestedArg|^Errors:|^Subtypes:"
    r"|Does not validate against any of the Union"
)


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-fixable error behind ``exc`` (jsonargparse wraps constructor errors), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (KDLError, MisconfigurationException, FileNotFoundError)):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _short_parse_error(msg: str) -> str:
    """jsonargparse reports every union member it tried; keep the lines that name the problem."""
    keep = [ln.strip() for ln in msg.splitlines() if ln.strip() and not re.search(_NOISE, ln.strip())]
    return "\n  ".join(keep[:6]) if keep else msg


#: kdl's commands that are not Trainer subcommands: name -> ("module:function", one-line help).
#: Each function takes the remaining argv and returns an exit status; modules load only when used.
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("kd_lightning.sample:main", "write GAN samples (N per class or label value) to a file or folder"),
    "generate": ("kd_lightning.sampling.generate:main", "build a cGAN-KD sample store (subsample, filter, relabel)"),
    "pipeline": ("kd_lightning.pipeline:main", "run a recipe's stages in order, skipping those already done"),
    "serve-teacher": ("kd_lightning.serve.server:main", "serve a classifier checkpoint as a black-box teacher"),
}


def run_tool_command(name: str, argv: list[str]) -> int:
    """Run one of :data:`TOOL_COMMANDS` on ``argv``."""
    import importlib

    target, _ = TOOL_COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv) or 0)


def main(args: list[str] | None = None) -> int:
    """Entry point of ``kdl``; returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] and argv[0] in TOOL_COMMANDS:  # not a Trainer subcommand
        return run_tool_command(argv[0], argv[1:])
    debug = os.environ.get("KDL_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    _quiet_lightning()
    cpu_defaults()
    try:
        if args is None:  # keep sys.argv as the CLI's source (minus our own --debug flag)
            sys.argv = sys.argv[:1] + argv
            build_cli(None)
        else:
            build_cli(argv)
    except SIGTERMException:
        print(f"kdl: stopped by SIGTERM; resume with --ckpt_path last (exit {EXIT_SIGTERM})", file=sys.stderr)
        return EXIT_SIGTERM
    except ArgumentError as e:
        if debug:
            raise
        print(
            f"kdl: error: {_short_parse_error(str(e))}\n(see `kdl {argv[0] if argv else ''} --help`; "
            "KDL_DEBUG=1 shows the full message)",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        user_error = _user_error(e)
        if debug or user_error is None:
            raise
        print(f"kdl: error: {user_error}\n(set KDL_DEBUG=1 or pass --debug for the full traceback)", file=sys.stderr)
        return 2
    return 0


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
