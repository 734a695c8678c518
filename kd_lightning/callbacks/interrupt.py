"""Clean interruption: on SIGTERM (or Ctrl-C) finish the current step, write ``last.ckpt``, exit 143 (130).

Lightning's own SIGTERM handling stops after the current batch but writes no checkpoint, and a
signal during validation stops mid-validation. :class:`GracefulStop` takes the signal over once
training has started and picks a point where the run's state is complete:

- during a training batch that is not followed by validation or the end of the epoch: after the
  batch, it writes ``last.ckpt`` itself;
- otherwise (a batch right before validation/epoch end, or during validation): it lets validation
  and the epoch end run, so the checkpoint callback writes ``last.ckpt`` as usual.

It then asks Lightning to stop (its ``SIGTERMException``), which ``kdl`` turns into exit code 128 +
the signal's number: 143 for SIGTERM, 130 for Ctrl-C (SIGINT; a second Ctrl-C aborts at once without
saving). Resume with ``kdl fit ... --ckpt_path last``.
Under DDP the signal is passed on to Lightning's handler, which makes every rank stop at the start
of the same training step; all ranks then write ``last.ckpt`` together (rank 0 writes the file) from
``on_exception``. A signal during DDP validation stops without a new checkpoint (the previous one stays).
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: exit status of a run stopped by SIGTERM after saving (128 + signal number, the shell convention)
EXIT_SIGTERM = 128 + int(signal.SIGTERM)


def exit_status_after_stop() -> int:
    """128 + the number of the signal that stopped the last run (SIGTERM unless it was Ctrl-C)."""
    return 128 + (GracefulStop.last_signal or int(signal.SIGTERM))


class GracefulStop(L.Callback):
    """Turn SIGTERM and SIGINT (Ctrl-C) into "finish the step, save ``last.ckpt``, stop".

    Args:
        signals: signal names to handle.
    """

    #: the signal that stopped the latest run of this process (read by ``kdl`` for its exit status)
    last_signal: int | None = None
    #: a second Ctrl-C aborted the latest run without saving (Lightning then exits 1; ``kdl`` makes it 130)
    aborted: bool = False

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        super().__init__()
        self.signals = tuple(signals)
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------ signal plumbing
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        first = not self.requested
        if not first and signum == signal.SIGINT:
            GracefulStop.aborted = True
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.requested = True
        if first:
            GracefulStop.last_signal = signum
            name = signal.Signals(signum).name
            rank_zero_info(f"kdl: received {name}; finishing the step and saving last.ckpt (Ctrl-C again aborts)")
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handler (which we replace, and call under DDP)
        self._trainer = trainer
        self.requested = False
        GracefulStop.last_signal = None
        GracefulStop.aborted = False
        for name in self.signals:
            signum = int(getattr(signal, name))
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler and previous is not None:
                signal.signal(signum, previous)
        self._previous = {}
        self._trainer = None

    # ------------------------------------------------------------------ stopping points
    def _stop(self, trainer: L.Trainer) -> None:
        """Let Lightning raise its ``SIGTERMException`` at its next check (end of batch or epoch)."""
        trainer._signal_connector.received_sigterm = True  # the flag behind `trainer.received_sigterm`

    def _followed_by_validation_or_epoch_end(self, trainer: L.Trainer) -> bool:
        if trainer.is_last_batch:
            return True
        loop = trainer.fit_loop
        try:
            return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - private API: assume the common case (validation at epoch end only)
            return False

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,  # noqa: ANN401 - Lightning's hook signature
        batch: Any,  # noqa: ANN401 - Lightning's hook signature
        batch_idx: int,
    ) -> None:
        if not self.requested or trainer.world_size > 1 or self._followed_by_validation_or_epoch_end(trainer):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"kdl: saved {path} after step {trainer.global_step}; stopping (exit {EXIT_SIGTERM})")
        self._stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # DDP: Lightning raised on every rank at the start of the same training step (state complete)
        if (
            isinstance(exception, SIGTERMException)
            and trainer.world_size > 1
            and self._trainer is not None
            and not trainer.validating
            and not trainer.sanity_checking
        ):
            trainer.save_checkpoint(last_checkpoint_path(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the checkpoint callback (which runs after us) writes last.ckpt for this validation
        if self.requested and not trainer.sanity_checking and trainer.world_size == 1:
            self._save_unless_checkpoint_callback_does(trainer)
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.requested and not trainer.received_sigterm and trainer.world_size == 1:
            self._save_unless_checkpoint_callback_does(trainer)
            self._stop(trainer)

    def _save_unless_checkpoint_callback_does(self, trainer: L.Trainer) -> None:
        if not any(isinstance(cb, ModelCheckpoint) and cb.save_last for cb in trainer.checkpoint_callbacks):
            trainer.save_checkpoint(last_checkpoint_path(trainer))


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where ``last.ckpt`` goes: the first checkpoint callback's folder, else ``<root>/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return os.path.join(str(cb.dirpath), cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
