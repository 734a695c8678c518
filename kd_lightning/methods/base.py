"""The template every kd_lightning LightningModule follows.

``__init__`` stores the hyper-parameters and then calls :meth:`BaseTask.configure_models`,
:meth:`BaseTask.configure_losses` and :meth:`BaseTask.configure_metrics`; a method overrides
these hooks, not the constructor. The data-determined arguments (``num_classes``,
``in_channels``, ``image_size``, ``mean``, ``std``, ``label_range``) are linked from the DataModule
by ``kdl``, so a recipe never states them; in Python, pass them yourself.

Images arrive in [0, 1]; a task normalises them itself (``self.normalize``) so that a checkpoint
carries the normalisation it was trained with and a teacher and a student trained with different
normalisations still work together on the same batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.types import OptimizerLRScheduler

from kd_lightning.checkpoints import state_mismatch
from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.nets.normalize import Normalize


def default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """SGD, lr 0.05, Nesterov momentum 0.9, weight decay 5e-4 (the CIFAR KD papers' recipe)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


#: LR scheduler arguments that count steps or epochs and must be positive (torch divides by them later)
_SCHEDULER_PERIODS = ("T_max", "step_size", "T_0", "total_steps", "total_iters")


def checked_scheduler(scheduler: Any) -> Any:  # noqa: ANN401 - any torch LR scheduler
    """``scheduler``, or a ConfigError naming a period of 0 (``T_max: 0`` fails much later as a ZeroDivisionError)."""
    for name in _SCHEDULER_PERIODS:
        value = getattr(scheduler, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(
                f"lr_scheduler {type(scheduler).__name__}: {name}={value}; expected a positive number "
                "(see model.init_args.lr_scheduler in the recipe)"
            )
    return scheduler


class CosineLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """Torch's cosine annealing whose length follows the run.

    ``T_max=None`` (the default) becomes ``trainer.max_epochs`` when the task builds it
    (:meth:`BaseTask.build_scheduler`), so a recipe that changes the number of epochs keeps a schedule that ends
    with the run. An explicit ``T_max`` is used as given.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, T_max: int | None = None, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        # torch reads T_max only from the first step() on, after build_scheduler has set it; 1 is a placeholder
        super().__init__(optimizer, T_max=1 if T_max is None else T_max, eta_min=eta_min, last_epoch=last_epoch)
        self.follows_max_epochs = T_max is None


class BaseTask(L.LightningModule):
    """Shared constructor template, optimiser/scheduler injection and data-compatibility checks.

    Args:
        num_classes: classes of the data (linked from the DataModule by ``kdl``).
        in_channels: image channels (linked).
        image_size: image side in pixels (linked).
        mean: per-channel mean used to normalise inputs (linked).
        std: per-channel standard deviation (linked).
        label_range: ``(min, max)`` of a regression label in original units (linked).
        optimizer: a callable that builds the optimiser from parameters
            (default :func:`default_optimizer`).
        lr_scheduler: a callable that builds an LR scheduler from the optimiser, stepped once
            per epoch; ``None`` keeps the learning rate constant.
    """

    #: what the model learns: "classification", "regression" or (an unconditional GAN) "any"
    task: str = "classification"
    #: metric the default checkpoint callback tracks (``None``: none, checkpoints keep the latest state), and in
    #: which direction
    monitor: str | None = "val/acc1"
    monitor_mode: str = "max"
    #: ``__init__`` arguments that are not hyper-parameters (optimiser factories: callables) and so stay out of
    #: ``hparams`` and checkpoints; a subclass with more extends the tuple
    hparams_ignore: ClassVar[tuple[str, ...]] = ("optimizer", "lr_scheduler")

    if TYPE_CHECKING:  # save_hyperparameters always stores an AttributeDict (Lightning's hint is a wider union)

        @property
        def hparams(self) -> AttributeDict: ...

    def __init__(
        self,
        num_classes: int | None = None,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        label_range: tuple[float, float] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.normalize = Normalize(mean or (0.5,), std or (0.5,), in_channels)
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # ------------------------------------------------------------------ template hooks
    def configure_models(self) -> None:
        """Build the networks (``self.hparams`` holds every constructor argument)."""

    def configure_losses(self) -> None:
        """Build the loss modules."""

    def configure_metrics(self) -> None:
        """Build the metric collections."""

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> Iterable[torch.Tensor]:
        """Parameters the optimiser updates (override to add connectors or exclude teachers)."""
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.build_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:  # noqa: ANN401 - any torch LR scheduler
        """The recipe's scheduler for ``optimizer``, checked.

        A :class:`CosineLR` without ``T_max`` gets the trainer's ``max_epochs`` (it is stepped once per epoch).
        """
        assert self.lr_scheduler_factory is not None
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, CosineLR) and scheduler.follows_max_epochs:
            epochs = self.trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ConfigError(
                    f"lr_scheduler {type(scheduler).__name__} without T_max follows trainer.max_epochs, which is "
                    f"{epochs}; set trainer.max_epochs or model.init_args.lr_scheduler.init_args.T_max"
                )
            scheduler.T_max = epochs
        return checked_scheduler(scheduler)

    # ------------------------------------------------------------------ checks
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another kind or shape with a message instead of a tensor error."""
        mismatch = state_mismatch(self.state_dict(), checkpoint.get("state_dict", {}))
        if mismatch:
            hp = checkpoint.get("hyper_parameters", {})
            made_by = ", ".join(f"{k}={hp[k]!r}" for k in ("net", "num_classes", "in_channels") if k in hp)
            ours_hp = ", ".join(
                f"{k}={self.hparams[k]!r}" for k in ("net", "num_classes", "in_channels") if k in self.hparams
            )
            raise CheckpointError(
                f"checkpoint does not fit {type(self).__name__}({ours_hp})"
                f"; it was saved by a model with {made_by or 'other hyper-parameters'} ({mismatch})"
            )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.check_data(dm)

    def check_data(self, dm: L.LightningDataModule) -> None:
        """Fail early, naming both values, when the data does not fit this model."""
        dm_task = getattr(dm, "task", self.task)
        if dm_task != self.task:
            raise ConfigError(
                f"{type(self).__name__} is a {self.task} model but {type(dm).__name__} is a {dm_task} dataset"
            )
        for key in ("num_classes", "in_channels"):
            ours, theirs = self.hparams.get(key), getattr(dm, key, None)
            if self.task == "regression" and key == "num_classes":
                continue
            if theirs is not None and ours != theirs:
                raise ConfigError(f"model has {key}={ours} but {type(dm).__name__} has {key}={theirs}")


class StageSteps:
    """Training, validation and test steps that all run ``self.model_step(batch, stage)``.

    A mixin for tasks whose three steps differ only in the stage name they log under.
    """

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """The loss of one batch; logs under ``stage`` (``train``, ``val`` or ``test``)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "test")
