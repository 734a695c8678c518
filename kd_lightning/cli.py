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

Over 400 lines because most of it is one class, :class:`KDLCLI`: Lightning's CLI hooks, in the order Lightning
calls them. What stands alone lives apart: the checkpoint callback (:mod:`kd_lightning.callbacks.checkpoint`), the
error messages (:mod:`kd_lightning.cli_errors`), the console (:mod:`kd_lightning.callbacks.progress`), W&B
(:mod:`kd_lightning.wandb_media`) and the CPU checks (:mod:`kd_lightning.cpu`).
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
import typing
import warnings
from typing import Any, Union

import lightning as L
import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

# ``from M import X as X``: a name that moved out of this module and stays importable from kd_lightning.cli (tests,
# benchmarks, the demo and notebooks import several from here)
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
from kd_lightning.callbacks.checkpoint import KDCheckpoint as KDCheckpoint
from kd_lightning.callbacks.checkpoint import named_checkpoint as named_checkpoint
from kd_lightning.callbacks.checkpoint import resolve_ckpt_path as resolve_ckpt_path
from kd_lightning.callbacks.progress import quiet_console as quiet_console
from kd_lightning.callbacks.progress import quiet_lightning as quiet_lightning
from kd_lightning.callbacks.save_config import SaveRunConfig
from kd_lightning.checkpoints import CONFIG_KEY, is_trusted, load_checkpoint, pop_trust_args, trust, trust_scope
from kd_lightning.cli_errors import DATA_HINT as DATA_HINT
from kd_lightning.cli_errors import _class_hint as _class_hint
from kd_lightning.cli_errors import _last_hint as _last_hint
from kd_lightning.cli_errors import _non_finite_value as _non_finite_value
from kd_lightning.cli_errors import _one_line as _one_line
from kd_lightning.cli_errors import _optimizer_error as _optimizer_error
from kd_lightning.cli_errors import _short_parse_error as _short_parse_error
from kd_lightning.cli_errors import _suggestion as _suggestion
from kd_lightning.cli_errors import _user_error as _user_error
from kd_lightning.cli_errors import check_config_files, known_options, parse_error_message, run_error_message
from kd_lightning.cpu import cpu_defaults as cpu_defaults
from kd_lightning.cpu import cpu_has_fast_bf16 as cpu_has_fast_bf16
from kd_lightning.errors import ConfigError, require_writable_folder
from kd_lightning.wandb_media import finish_wandb_run as finish_wandb_run
from kd_lightning.wandb_media import log_wandb_recipe, name_wandb_loggers, prepare_wandb_run

#: DataModule attributes that kdl passes on to the model's constructor arguments of the same name
LINKED_DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std", "label_range")
#: ``--ckpt_path none``: evaluate the model as the recipe builds it (untrained), on purpose
UNTRAINED = "none"
#: where ``kdl predict`` writes its predictions, under ``trainer.default_root_dir``
PREDICTIONS_FILE = "predictions.pt"


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
        name_wandb_loggers(cfg, lambda: method_name(_plain(cfg.get("model")) or {}))

    def _subcommand_config(self) -> Namespace:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def recipe(self) -> dict[str, Any]:
        """The model and data sections of the resolved recipe, as plain values (stored in checkpoints)."""
        cfg = self._subcommand_config()
        return {key: _plain(cfg.get(key)) for key in ("model", "data")}

    def full_recipe(self) -> dict[str, Any]:
        """The whole resolved recipe as plain values, without the ``--config`` file names."""
        full = _plain(self._subcommand_config())
        full.pop("config", None)
        return full

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
        log_wandb_recipe(trainer, self.full_recipe)
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
        message = parse_error_message(e, argv)
        print(f"kdl: error: {message}\n(see `{hint}`; KDL_DEBUG=1 shows the full message)", file=sys.stderr)
        return 2
    except Exception as e:
        for root in _RUN_ROOTS:  # a run that failed before logging anything leaves no empty version_N behind
            remove_empty_log_dirs(root)
        reason = run_error_message(e)
        if debug or reason is None:
            raise
        print(f"kdl: error: {reason}\n(set KDL_DEBUG=1 or pass --debug for the full traceback)", file=sys.stderr)
        return 2
    return 0


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
