"""Stop at the first non-finite loss, naming the step and the loss part, before it reaches the weights."""

from __future__ import annotations

import lightning as L
import torch

from kd_lightning.errors import KDLError


class NonFiniteLossError(KDLError):
    """The training loss became NaN or infinite; the checkpoints on disk are from before it."""


class NaNGuard(L.Callback):
    """Check the loss before every backward pass; raise :class:`NonFiniteLossError` if it is not finite.

    The check runs before the optimiser step, so the weights never see the bad gradient and no
    checkpoint is written after it: ``last.ckpt`` stays the last good one. The error names the
    global step and every non-finite part the method logged for this step (``train/loss``,
    ``train/kd/<name>``, ...), so the user knows which term to look at.

    Args:
        check_every_n_steps: check every n-th step (1 = every step; each check is one sync on GPU).
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps}; expected a positive integer")
        self.check_every_n_steps = check_every_n_steps

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if trainer.global_step % self.check_every_n_steps:
            return
        if bool(torch.isfinite(loss.detach()).all()):
            return
        parts = non_finite_logged(trainer)
        named = ", ".join(f"{k}={v}" for k, v in parts.items()) or f"loss={loss.detach().float().item()}"
        raise NonFiniteLossError(
            f"non-finite loss at step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{trainer.fit_loop.epoch_loop.batch_idx}): {named}. Training stopped before the optimiser step; "
            "the last good checkpoint is kept. Lower the learning rate, enable gradient clipping, or check the "
            "named loss part"
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
