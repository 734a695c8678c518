"""Stop at the first non-finite loss, naming the step and the loss part."""

from __future__ import annotations

import lightning as L
import torch

from kd_lightning.errors import KDLError

#: steps between two host syncs of the check on an accelerator when ``check_every_n_steps`` is left automatic
ACCELERATOR_EVERY_N_STEPS = 16


class NonFiniteLossError(KDLError):
    """The training loss became NaN or infinite; the checkpoints on disk are from before it."""


class NaNGuard(L.Callback):
    """Check the loss before every backward pass; raise :class:`NonFiniteLossError` if it is not finite.

    A check on every step runs before the optimiser step, so the weights never see the bad gradient and no
    checkpoint is written after it: ``last.ckpt`` stays the last good one. The error names the global step and
    every non-finite part the method logged for this step (``train/loss``, ``train/kd/<name>``, ...), so the user
    knows which term to look at.

    Reading the result on the host is free on a CPU (its kernels have already run) but stalls an accelerator's
    queue. So with ``n`` steps between checks, every step still tests its loss, on the device and without a
    sync, and keeps the first bad step and its loss there; every ``n``-th step (and the end of each epoch)
    reads that record once. A NaN is then reported within ``n`` steps, at the exact step where it appeared; the
    steps in between have updated the weights (and may have written checkpoints), which the message says.

    Args:
        check_every_n_steps: steps between two reads of the record (1 = every step, before its optimiser
            step). ``None`` (default): 1 on a CPU, 16 on an accelerator.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        super().__init__()
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps}; expected a positive integer or null")
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: torch.Tensor | None = None  # [global step, loss] of the first non-finite loss; step -1: none

    def every_n(self, trainer: L.Trainer) -> int:
        """Steps between two reads of the record on this trainer's device."""
        if self.check_every_n_steps is not None:
            return self.check_every_n_steps
        return 1 if trainer.strategy.root_device.type == "cpu" else ACCELERATOR_EVERY_N_STEPS

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        n, step = self.every_n(trainer), trainer.global_step
        if n == 1:
            if not bool(torch.isfinite(loss).all()):
                self._raise(trainer, step, float(loss.float().reshape(-1)[0]), now=True)
            return
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        first = self._first_bad
        value = loss.float().reshape(-1)[0]
        record = ~torch.isfinite(loss).all() & (first[0] < 0)  # no sync: the device keeps the first bad step
        now = torch.stack([value.new_full((), float(step)), value])  # a fill kernel, no host-to-device copy
        first.copy_(torch.where(record, now, first))
        if step % n == 0:
            self._read(trainer, now_step=step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)

    def _read(self, trainer: L.Trainer, now_step: int | None = None) -> None:
        if self._first_bad is None:
            return
        step, value = self._first_bad.tolist()  # the one host sync
        if step >= 0:
            self._raise(trainer, int(step), value, now=now_step == int(step))

    def _raise(self, trainer: L.Trainer, step: int, value: float, now: bool) -> None:
        parts = non_finite_logged(trainer) if now else {}
        named = ", ".join(f"{k}={v}" for k, v in parts.items()) or f"loss={value}"
        if now:
            where = f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx})"
            kept = "Training stopped before the optimiser step; the last good checkpoint is kept"
        else:
            where = f"(found at step {trainer.global_step}: checks run every {self.every_n(trainer)} steps)"
            kept = f"The weights were updated after step {step}: use a checkpoint written before it"
        raise NonFiniteLossError(
            f"non-finite loss at step {step} {where}: {named}. {kept}. Lower the learning rate, enable gradient "
            "clipping, or check the named loss part"
        )


def non_finite_logged(trainer: L.Trainer) -> dict[str, float]:
    """The values logged during the current training step that are NaN or infinite."""
    out: dict[str, float] = {}
    results = getattr(trainer.fit_loop.epoch_loop, "_results", None)
    if results is None:
        return out
    for result in results.values():
        value = getattr(result, "_forward_cache", None)  # the value logged at this step
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        value = value.detach().float()
        if not bool(torch.isfinite(value).all()):
            bad = value[~torch.isfinite(value)].reshape(-1)[0]
            out[result.meta.name] = float(bad)
    return out
