"""``kdl``'s Trainer commands: Lightning's CLI for kd_lightning recipes.

``kdl fit|validate|test|predict --config RECIPE.yaml [--config MORE.yaml] [--key value ...]``
(:mod:`kd_lightning.commands` dispatches every ``kdl`` command; these four come to :func:`run_trainer`).
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

import argparse
import difflib
import glob
import logging
import os
import re
import signal
import sys
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, Union

import lightning as L
import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import kd_lightning.data  # registers the DataModules for short class names (and is used below)
import kd_lightning.methods  # noqa: F401  (register LightningModules for short class names)
from kd_lightning.callbacks import (
    AtomicCheckpointIO,
    Curves,
    GracefulStop,
    NaNGuard,
    ResumeState,
    config_differences,
    exit_status_after_stop,
)
from kd_lightning.callbacks.save_config import SaveRunConfig
from kd_lightning.checkpoints import CONFIG_KEY, is_trusted, load_checkpoint, pop_trust_args, trust, trust_scope
from kd_lightning.errors import ConfigError, DataCorruptError, DataNotFoundError, KDLError, require_writable_folder
from kd_lightning.fileio import read_yaml
from kd_lightning.wandb_media import prepare_wandb_run, sweep_trial, wandb_loggers

#: the line after a missing-data error: where datasets come from, and the quick check
DATA_HINT = "where to get each dataset and its layout: docs/datasets.md; check it with `kdl check-data --config RECIPE`"
#: DataModule attributes that kdl passes on to the model's constructor arguments of the same name
LINKED_DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std", "label_range")
#: ``--ckpt_path none``: evaluate the model as the recipe builds it (untrained), on purpose
UNTRAINED = "none"
#: where ``kdl predict`` writes its predictions, under ``trainer.default_root_dir``
PREDICTIONS_FILE = "predictions.pt"


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
    # latest state, so last.ckpt is (also) written at every validation / epoch-end save point. There is no
    # public hook for this: the private methods used here are pinned by tests/test_lightning_internals.py.
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
        monitor = getattr(model, "monitor", None)  # BaseTask's selection metric; other modules have none
        if self.monitor is None and monitor:
            self.monitor = monitor
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

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # a typo must fail, not silently match a longer key
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            e.kdl_options = known_options(parser)  # type: ignore[attr-defined]  # for "did you mean"
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(KDCheckpoint, "checkpoint")
        parser.add_lightning_class_args(GracefulStop, "graceful_stop")
        parser.add_lightning_class_args(NaNGuard, "nan_guard")
        parser.add_lightning_class_args(Curves, "curves")
        parser.add_argument(
            "--allow_resume_mismatch",
            type=bool,
            default=False,
            help="resume even when the recipe's model/data differ from the checkpoint's",
        )
        for key in LINKED_DATA_FACTS:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        prefer_int_to_float(parser, "trainer.")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (safely) without merging its hyper-parameters into the recipe.

        Lightning's CLI would overwrite the recipe's model section with the checkpoint's; kdl keeps the
        recipe as written, so that resuming compares like with like (:meth:`check_checkpoint_matches`).
        ``--weights_only false`` trusts this one file (a teacher or other file stays weights-only); a file
        trusted by ``--trust`` is passed to Lightning with ``weights_only=False`` too.
        """
        sub = self.config.get("subcommand")
        cfg = self.config.get(sub, {}) if sub else {}
        path = cfg.get("ckpt_path")
        if path and path not in ("last", "best", "hpc", "registry", UNTRAINED):
            if cfg.get("weights_only") is False:
                trust(path)
            elif is_trusted(path):
                cfg["weights_only"] = False
            load_checkpoint(path, mmap=True)

    def before_instantiate_classes(self) -> None:
        self.name_wandb_run()
        root = (self._subcommand_config().get("trainer") or {}).get("default_root_dir")
        _RUN_ROOTS.append(str(root or os.getcwd()))
        trainer = self._subcommand_config().get("trainer", {}) or {}
        precision, accelerator = str(trainer.get("precision") or ""), str(trainer.get("accelerator") or "auto")
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        # Lightning runs fp16 AMP on a CPU as bf16 autocast, so it gets the same warning
        as_bf16 = "bf16" in precision or precision in ("16", "16-mixed")
        if as_bf16 and on_cpu and not cpu_has_fast_bf16():
            becomes = "" if "bf16" in precision else " (on a CPU, Lightning runs it as bf16-mixed)"
            warnings.warn(
                f"trainer.precision={precision!r}{becomes} on a CPU without AMX: bf16 autocast was measured ~15x "
                "slower than fp32 on such CPUs; use precision 32 here and bf16-mixed on GPUs",
                stacklevel=1,
            )
        root = trainer.get("default_root_dir")
        require_writable_folder(str(root) if root else os.getcwd(), "trainer.default_root_dir")

    def name_wandb_run(self) -> None:
        """A W&B logger without a name/group gets ``<method>-seed<N>`` and the recipe, so W&B groups seeds."""
        from kd_lightning.report import method_name

        cfg = self._subcommand_config()
        loggers = cfg.get("trainer", {}).get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
                continue
            method, seed = method_name(_plain(cfg.get("model")) or {}), cfg.get("seed_everything")
            recipes = [Path(str(p)) for p in cfg.get("config") or []]
            recipe = f"{recipes[0].parent.name}/{recipes[0].stem}" if recipes else method
            defaults = {"name": f"{method}-seed{seed}", "group": recipe, "tags": [method, f"seed{seed}", recipe]}
            trial = sweep_trial()  # a kdl sweep trial: named by its swept values, grouped by its sweep
            if trial is not None:
                defaults |= {"name": trial["trial"], "group": trial["group"], "tags": [method, recipe, trial["name"]]}
            for key, value in defaults.items():  # wandb.init's own arguments, which jsonargparse exposes
                if logger.init_args.get(key) is None:
                    logger.init_args[key] = value
            # wandb's background service resolves a relative save_dir against the folder IT started in, not ours:
            # make it absolute; unset, the W&B files go into the run folder
            save_dir = logger.init_args.get("save_dir")
            if save_dir in (None, "", "."):
                save_dir = cfg.get("trainer", {}).get("default_root_dir") or "."
            logger.init_args["save_dir"] = os.path.abspath(str(save_dir))
            os.makedirs(logger.init_args["save_dir"], exist_ok=True)  # else W&B warns "git root ... does not exist"

    def _subcommand_config(self) -> Namespace:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def recipe(self) -> dict[str, Any]:
        """The model and data sections of the resolved recipe, as plain values (stored in checkpoints)."""
        cfg = self._subcommand_config()
        return {key: _plain(cfg.get(key)) for key in ("model", "data")}

    def after_instantiate_classes(self) -> None:
        trainer = self.trainer
        # the Trainer's callback list: its CallbackConnector sets the attribute, so Trainer declares none
        callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
        for cb in callbacks:
            if isinstance(cb, KDCheckpoint):
                cb.bind(trainer, self.model)
        if not any(isinstance(cb, ResumeState) for cb in callbacks):
            callbacks.insert(0, ResumeState(self.recipe()))
        quiet_console(callbacks)
        eval_modules = [m for m in self.model.modules() if not m.training]
        if eval_modules and not any(p.requires_grad for m in eval_modules for p in m.parameters()):
            # only frozen parts (a KD teacher) are in eval mode, as they must be: Lightning's warning is not news
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":  # the whole resolved recipe, not only the model's hparams
                wandb_init: dict[str, Any] = getattr(logger, "_wandb_init", {})
                if "anonymous" in wandb_init and wandb_init["anonymous"] is None:  # W&B warns it has no effect
                    del wandb_init["anonymous"]
                full = _plain(self._subcommand_config())
                full.pop("config", None)
                logger.log_hyperparams({"kdl": full})
        prepare_wandb_run(trainer, self.model, self.subcommand)

    def before_fit(self) -> None:
        if str(self._ckpt_path()).lower() == UNTRAINED:  # a fresh fit, as without --ckpt_path
            self.config_init[self.subcommand]["ckpt_path"] = None
        self.check_checkpoint_matches(with_data=True)

    def after_fit(self) -> None:
        finish_wandb_run(self.trainer)
        if getattr(self.trainer, "fast_dev_run", False):
            print(
                "fast_dev_run: a smoke test; no best.ckpt is chosen (a later stage naming best.ckpt will not find it)",
                file=sys.stderr,
            )

    def after_validate(self) -> None:
        finish_wandb_run(self.trainer)

    after_test = after_predict = after_validate

    def before_validate(self) -> None:
        self.choose_checkpoint()
        self.check_checkpoint_matches(with_data=False)

    before_test = before_predict = before_validate

    def _ckpt_path(self) -> Any:  # noqa: ANN401 - a path, a name (last, best) or None
        return self.config_init[self.subcommand].get("ckpt_path") if self.subcommand else None

    def choose_checkpoint(self) -> None:
        """``validate``/``test``/``predict`` evaluate a trained model: pick its file, or refuse.

        Without ``--ckpt_path`` Lightning would evaluate the freshly initialised model and report its
        metrics as if they meant something; kdl refuses unless the model loads its weights itself
        (``net_weights``) or the user asks for it with ``--ckpt_path none``. ``last`` and ``best`` become
        the files of the run folder's checkpoint callback, and a missing one is an error (Lightning
        would warn and evaluate the untrained model, or fail in a fresh process for ``best``).
        """
        sub, given = self.subcommand, self._ckpt_path()
        cfg = self.config_init[sub]
        if given is not None and str(given).lower() == UNTRAINED:
            rank_zero_warn(f"kdl {sub} --ckpt_path none: evaluating the model as the recipe builds it (untrained)")
            cfg["ckpt_path"] = None
            return
        root = self.trainer.default_root_dir
        if given is None:
            if getattr(self.model, "hparams", {}).get("net_weights"):
                return  # the net loaded its weights from net_weights
            raise ConfigError(
                f"kdl {sub} without --ckpt_path would evaluate an untrained {type(self.model).__name__}; pass "
                f"--ckpt_path PATH, or last / best (of the run folder {root!r}), or --ckpt_path none to "
                "evaluate it untrained on purpose"
            )
        if given in ("last", "best"):
            path = named_checkpoint(given, self.trainer)
            if path is None:
                callbacks = [cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
                folders = sorted({str(cb.dirpath) for cb in callbacks if cb.dirpath})
                raise ConfigError(
                    f"--ckpt_path {given}: no {given} checkpoint in {', '.join(folders) or root!r} "
                    f"(trainer.default_root_dir={root!r}); is that the run folder of the fit? "
                    "pass the checkpoint's path otherwise"
                )
            cfg["ckpt_path"] = path

    def predict(self, **kwargs: Any) -> None:
        """Lightning's predict, then its outputs written to ``<default_root_dir>/predictions.pt``."""
        kwargs["return_predictions"] = True
        outputs = self.trainer.predict(**kwargs)
        path, count = write_predictions(outputs, self.trainer)
        if self.trainer.is_global_zero:
            what = f"{count} predictions" if count is not None else "the predictions"
            print(f"kdl predict: wrote {what} to {path}", file=sys.stderr)

    def check_checkpoint_matches(self, with_data: bool) -> None:
        """Refuse a ``--ckpt_path`` whose net, or for ``fit`` (``with_data``) any model or data key, differs.

        ``--allow_resume_mismatch true`` lifts the check for other keys, never for the net: its weights
        cannot load into another.
        """
        cfg = self._subcommand_config()
        path = resolve_ckpt_path(self._ckpt_path(), self.trainer)
        if path is None:
            return
        if cfg.get("weights_only") is False:  # "last"/"best" resolved: the opt-in names this file
            trust(path)
        saved = load_checkpoint(path, mmap=True).get(CONFIG_KEY)
        if not isinstance(saved, dict):
            return
        diffs = config_differences({k: saved.get(k) for k in ("model", "data")}, self.recipe())
        net = next((d for d in diffs if d[0] == "model.init_args.net"), None)
        if net is not None:
            raise ConfigError(
                f"checkpoint {path!r} holds a {net[1]!r} net, the recipe builds {net[2]!r}: its weights cannot "
                "load into another net; use the checkpoint's recipe or start a new run"
            )
        if diffs and with_data and not cfg.get("allow_resume_mismatch"):
            lines = "\n".join(f"  {k}: checkpoint={a!r} now={b!r}" for k, a, b in diffs)
            raise ConfigError(
                f"refusing to resume from {path!r}: the recipe differs from the checkpoint's in "
                f"{len(diffs)} key(s):\n{lines}\npass --allow_resume_mismatch true to resume anyway"
            )


#: the run folders of the commands started in this process (a failed one's empty log folders are removed)
_RUN_ROOTS: list[str] = []


def remove_empty_log_dirs(root: str) -> list[str]:
    """Remove ``<root>/lightning_logs/version_N`` folders that are empty, then the folders above if emptied."""
    logs = os.path.join(root, "lightning_logs")
    removed = []
    for version in sorted(glob.glob(os.path.join(glob.escape(logs), "version_*"))):
        if os.path.isdir(version) and not os.listdir(version):
            os.rmdir(version)
            removed.append(version)
    for folder in (logs, root):
        if removed and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
            removed.append(folder)
    return removed


def quiet_console(callbacks: list[L.Callback]) -> None:
    """Swap Lightning's console callbacks for kdl's: no FLOPs column of zeros; plain lines when stderr is no terminal.

    A redrawn progress bar written into a log file is megabytes of carriage returns; there one line per epoch says
    more. ``KDL_PROGRESS=bar`` keeps the bar, ``KDL_PROGRESS=plain`` forces the lines.
    """
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar

    from kd_lightning.callbacks.progress import PlainProgress, QuietSummary

    choice = os.environ.get("KDL_PROGRESS", "")
    plain = choice == "plain" or (choice != "bar" and not sys.stderr.isatty())
    # Lightning picks the Rich variants by default when the `rich` package happens to be installed (a dependency
    # of other tools): treat them as its plain defaults, so kdl's output does not depend on what else is installed
    for i, cb in enumerate(callbacks):
        if type(cb) in (ModelSummary, RichModelSummary):
            callbacks[i] = QuietSummary(max_depth=cb._max_depth)
        elif type(cb) in (TQDMProgressBar, RichProgressBar) and plain:
            callbacks[i] = PlainProgress()


def finish_wandb_run(trainer: L.Trainer) -> None:
    """Close this command's W&B run, so the next command in the same process starts its own."""
    if wandb_loggers(trainer):
        import wandb

        if wandb.run is not None:
            wandb.run.finish()


def known_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` of ``parser`` and of its subcommands' parsers."""
    options = [o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
    for action in getattr(parser, "_actions", []):
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(action.choices, dict) else ():
            options += known_options(sub)
    return options


def resolve_ckpt_path(ckpt_path: str | os.PathLike | None, trainer: L.Trainer) -> str | None:
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


def named_checkpoint(name: str, trainer: L.Trainer) -> str | None:
    """The file of ``--ckpt_path last`` or ``best`` in the checkpoint callbacks' folders, if it exists."""
    if name == "last":
        return resolve_ckpt_path("last", trainer)
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.best_model_path and os.path.isfile(cb.best_model_path):
            return cb.best_model_path
        if cb.dirpath and cb.filename and "{" not in cb.filename:
            path = os.path.join(str(cb.dirpath), cb.filename + cb.FILE_EXTENSION)
            if os.path.isfile(path):
                return path
    return None


def write_predictions(outputs: Any, trainer: L.Trainer) -> tuple[str, int | None]:  # noqa: ANN401 - batch outputs
    """Save ``trainer.predict``'s outputs in the run folder; returns the file and the number of samples.

    Batches of dicts of tensors (kdl's tasks: ``index``, ``label`` and ``logits`` or ``prediction``) are
    joined into one dict of tensors; anything else is saved as Lightning returned it. Under DDP each rank
    writes its own ``predictions-rank<N>.pt``.
    """
    from kd_lightning.fileio import atomic_replace

    batches = outputs if isinstance(outputs, list) else []
    if batches and isinstance(batches[0], list):  # several predict loaders: one list per loader
        batches = [b for loader in batches for b in loader]
    data: Any = outputs
    count = None
    if batches and all(isinstance(b, dict) and all(torch.is_tensor(v) for v in b.values()) for b in batches):
        data = {k: torch.cat([b[k].detach().cpu() for b in batches]) for k in batches[0]}
        count = len(next(iter(data.values()))) if data else 0
    name = PREDICTIONS_FILE if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.pt"
    path = os.path.join(str(trainer.default_root_dir), name)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_replace(path, lambda tmp: torch.save(data, tmp))
    return path, count


def prefer_int_to_float(parser: argparse.ArgumentParser, prefix: str) -> None:
    """Parse ``1`` as the int 1 where a Trainer argument takes an int (batches) or a float (a fraction).

    Lightning types ``limit_val_batches`` and its kin ``float | int | None``; jsonargparse tries the types in that
    order, so ``--trainer.limit_val_batches 1`` became 1.0, i.e. 100 % of the batches. ``1.0`` stays a float.
    """
    for action in getattr(parser, "_actions", []):
        hint = getattr(action, "_typehint", None)  # jsonargparse's ActionTypeHint
        if not str(action.dest).startswith(prefix) or typing.get_origin(hint) is not Union:
            continue
        args = typing.get_args(hint)
        if float in args and int in args and args.index(float) < args.index(int):
            # the same kind of hint as Lightning's (typing.Union), built from a tuple of members
            action._typehint = Union[tuple([int, *(a for a in args if a is not int)])]  # noqa: UP007


def _plain(value: object) -> Any:  # noqa: ANN401 - a JSON-like tree
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
        save_config_callback=SaveRunConfig,  # a test never overwrites its fit's config.yaml
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
        args=args,
        run=run,
    )


#: Lightning's info lines that say nothing about the user's run (hardware it did not use, cloud tips)
_DROPPED_INFO = ("Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(s in msg for s in _DROPPED_INFO)


def quiet_lightning() -> None:
    """Silence advice that is noise for kdl users (cloud-logger tips, the tensorboardX notice)."""
    for msg in (
        ".*tensorboardX.*",
        ".*does not have many workers.*",
        "LightningCLI's args parameter is intended to run from within Python.*",  # kdl passes its argv on purpose
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's own use of torch's pytree
    ):
        warnings.filterwarnings("ignore", message=msg)
    logging.getLogger("lightning.pytorch").addFilter(_DropTips())
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(_DropTips())


_NOISE = (
    r"Expected a <class 'NoneType'>|^Given value type|^Given value: [\[{]|NestedArg|^Errors:|^Subtypes:"
    r"|Does not validate against any of the Union"
)


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-fixable error behind ``exc`` (jsonargparse wraps constructor errors), if any."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (KDLError, MisconfigurationException, FileNotFoundError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def _one_line(message: str) -> str:
    """The one line that matters in an error re-raised from a DataLoader worker.

    It comes back as "Caught X in DataLoader worker process N" plus the worker's whole traceback: keep the
    original message (its last line) without the exception's class name.
    """
    if "in DataLoader worker process" not in message or "Original Traceback" not in message:
        return message
    last = [ln.strip() for ln in message.splitlines() if ln.strip()][-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


_NON_FINITE = {"nan", "+nan", "-nan", ".nan", "inf", "+inf", "-inf", ".inf", "-.inf", "infinity", "-infinity"}


def _non_finite_value(argv: list[str], message: str) -> str | None:
    """``--key nan`` (or inf) where the parser expected a number: jsonargparse's union dump, said in one line."""
    for i, tok in enumerate(argv):
        key, _, value = tok.partition("=")
        if not key.startswith("--"):
            continue
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        name = key.rsplit(".", 1)[-1]
        if value.strip().lower() in _NON_FINITE and f'"{name}"' in message:
            return f"{key[2:]}={value}; expected a finite number"
    return None


def _short_parse_error(msg: str) -> str:
    """Keep the lines of a jsonargparse error that name the problem (it reports every union member it tried)."""
    keep = [ln.strip() for ln in msg.splitlines() if ln.strip() and not re.search(_NOISE, ln.strip())]
    return "\n  ".join(keep[:6]) if keep else msg


def check_config_files(argv: list[str]) -> None:
    """Every ``--config``/``-c`` file must exist and hold a YAML mapping of sections; name the file if not."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if os.path.isdir(path):
            raise ConfigError(f"--config {path!r} is a folder; expected a YAML recipe file")
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path!r} does not exist")
        content = read_yaml(path, f"--config {path!r}")
        if content is None:
            raise ConfigError(f"--config {path!r} is empty; expected a mapping of sections (trainer, model, data)")
        if not isinstance(content, dict):
            kind = type(content).__name__
            raise ConfigError(
                f"--config {path!r} holds a {kind}; expected a mapping of sections (trainer, model, data)"
            )


def _suggestion(message: str, options: list[str]) -> str:
    """Suggest "did you mean ...?" for the first unrecognised ``--key`` in a parse error, when one is close."""
    found = re.search(r"[Uu]nrecognized arguments:\s*(--[\w.\-]+)", message)
    if not found or not options:
        return ""
    close = difflib.get_close_matches(found.group(1), options, n=1, cutoff=0.8)
    return f"\ndid you mean {close[0]}?" if close else ""


def _class_hint(message: str) -> str:
    """For an unknown class name in a recipe, the names that would have worked (KD losses, for now)."""
    found = re.search(r"Expected a dot import path string: (\S+)", message)
    if not found:
        return ""
    if "kd_losses" in message:
        from kd_lightning.losses import list_losses

        return f"unknown KD loss {found.group(1)!r}; known losses: {', '.join(list_losses())}"
    return ""


def _optimizer_error(exc: BaseException) -> str | None:
    """The message of a ValueError/TypeError raised while building an optimiser or LR scheduler."""
    if not isinstance(exc, (ValueError, TypeError)):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    if any(f"{os.sep}torch{os.sep}optim{os.sep}" in frame.filename for frame in frames):
        return (
            f"the optimiser or LR scheduler rejected its settings: {exc} "
            "(see model.init_args.optimizer / model.init_args.lr_scheduler in the recipe)"
        )
    return None


def run_trainer(argv: list[str]) -> int:
    """Run a Lightning command (``fit``, ``validate``, ``test``, ``predict``) on ``argv``; returns the exit status.

    :func:`kd_lightning.commands.main` chooses the command and calls this for the Trainer ones.
    """
    argv = list(argv)
    debug = os.environ.get("KDL_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    quiet_lightning()
    cpu_defaults()
    command = argv[0] if argv[:1] and argv[0] in KDLCLI.subcommands() else None
    _RUN_ROOTS.clear()
    GracefulStop.aborted = False
    try:
        argv, trusted = pop_trust_args(argv)
        check_config_files(argv)
        with trust_scope(trusted):
            build_cli(argv)
    except SIGTERMException:
        status = exit_status_after_stop()
        name = signal.Signals(status - 128).name
        print(f"kdl: stopped by {name} after saving; resume with --ckpt_path last (exit {status})", file=sys.stderr)
        return status
    except SystemExit:  # after SIGTERMException, which is a SystemExit too
        if not GracefulStop.aborted:  # --help, or jsonargparse's own exit
            raise
        # Lightning caught the KeyboardInterrupt of the second Ctrl-C and called sys.exit(1)
        print(f"kdl: aborted by a second Ctrl-C without saving; {_last_hint()} (exit 130)", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"kdl: interrupted by Ctrl-C; {_last_hint()} (exit 130)", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except ArgumentError as e:
        if debug:
            raise
        hint = f"kdl {command} --help" if command else "kdl --help"
        message = (
            _class_hint(str(e))
            or _non_finite_value(argv, str(e))
            or _short_parse_error(str(e)) + _suggestion(str(e), getattr(e, "kdl_options", []))
        )
        print(f"kdl: error: {message}\n(see `{hint}`; KDL_DEBUG=1 shows the full message)", file=sys.stderr)
        return 2
    except Exception as e:
        for root in _RUN_ROOTS:  # a run that failed before logging anything leaves no empty version_N behind
            remove_empty_log_dirs(root)
        user_error = _user_error(e)
        reason = _one_line(str(user_error)) if user_error is not None else _optimizer_error(e)
        if debug or reason is None:
            raise
        if isinstance(user_error, DataNotFoundError) and not isinstance(user_error, DataCorruptError):
            reason += f"\n{DATA_HINT}"
        print(f"kdl: error: {reason}\n(set KDL_DEBUG=1 or pass --debug for the full traceback)", file=sys.stderr)
        return 2
    return 0


def _last_hint() -> str:
    return "the last saved last.ckpt (if any) is intact: resume with --ckpt_path last"


def main(args: list[str] | None = None) -> int:
    """``kdl`` on ``args`` (default ``sys.argv[1:]``), for ``python -m kd_lightning.cli`` and older callers.

    The one dispatch is :func:`kd_lightning.commands.main`; this forwards to it.
    """
    from kd_lightning.commands import main as kdl

    return kdl(list(sys.argv[1:] if args is None else args))


def entrypoint() -> None:
    """Run ``kdl`` and exit with its status."""
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
