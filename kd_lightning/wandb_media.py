"""Images and tables for the W&B loggers of a trainer; every other logger is left alone.

One place decides which loggers take media: :func:`wandb_loggers` (``isinstance`` of Lightning's
``WandbLogger``; wandb itself is imported by that logger only when it is used).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (an empty list without any)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_image(trainer: L.Trainer, key: str, path: str | os.PathLike, step: int | None = None) -> None:
    """Log the image file ``path`` under ``key`` to every W&B logger (at ``step`` when given)."""
    extra: dict[str, Any] = {} if step is None else {"step": step}
    for logger in wandb_loggers(trainer):
        logger.log_image(key=key, images=[str(path)], **extra)


def log_table(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table under ``key`` to every W&B logger."""
    for logger in wandb_loggers(trainer):
        logger.log_table(key=key, columns=columns, data=rows)
