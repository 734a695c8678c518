"""The interface every KD loss implements, and the lookup of losses by name.

A KD loss is an ``nn.Module`` that compares a student's outputs with a teacher's on one batch:

- it declares the features it needs by name (``student_features`` / ``teacher_features``: the
  net's ``stage{i}`` / ``penultimate`` aliases or module paths, read with forward hooks);
- :meth:`KDLoss.setup` is called once with the feature shapes (probed with a dummy batch), so a
  loss that needs a connector (regressor, embedding) builds it there and owns it — its parameters
  are then optimised with the student's, and a shape that cannot be adapted fails here, with a
  message, never mid-run;
- :meth:`KDLoss.forward` returns a scalar (or a dict of named scalars that are summed);
- ``weight`` scales it in the total loss; ``uses_logits`` marks losses that compare class
  outputs, which are refused for regression.

Adding a loss is one class: subclass :class:`KDLoss` in a module of ``kd_lightning/losses`` (imported by its
``__init__``); :func:`list_losses` finds it, ``tests/test_distill.py`` trains a student with it, and
``tests/test_kd_losses.py`` fails until it has a golden test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kd_lightning.errors import ConfigError


@dataclass
class Outputs:
    """One model's outputs on a batch: logits (or N x 1 regression outputs) and named features."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SetupInfo:
    """What a loss may need to know to build its connectors."""

    student_shapes: dict[str, torch.Size]
    teacher_shapes: dict[str, torch.Size]
    num_classes: int | None
    task: str = "classification"
    #: the frozen teacher's network, for losses that reuse a part of it (SimKD's classifier)
    teacher_net: nn.Module | None = None


@dataclass
class StepContext:
    """Access to the models for losses that need extra forward passes (e.g. SSKD's rotations).

    ``student(x)`` runs the student with gradients, ``teacher(x)`` the frozen teacher without; both
    take images in [0, 1] and return :class:`Outputs` with the features the loss declared.
    """

    student: Callable[[torch.Tensor], Outputs]
    teacher: Callable[[torch.Tensor], Outputs]
    epoch: int = 0
    training: bool = True


class KDLoss(nn.Module):
    """Base class of the KD losses.

    Args:
        weight: factor of this term in the total loss.
    """

    #: features this loss reads from the student / the teacher (names as in the net registry)
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()
    #: compares class outputs: refused for regression
    uses_logits: bool = False
    #: needs the sample indices of the batch (``batch["index"]``) and the size of their range
    uses_indices: bool = False
    #: needs the class of every training index (:meth:`setup_labels`)
    uses_labels: bool = False
    #: a teacher-student loss for ``DistillModule`` (False: a self-distillation term, see ``losses/self_kd.py``)
    for_distill: bool = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ConfigError(f"{type(self).__name__}: weight={weight}; expected a value >= 0")
        self.weight = float(weight)

    @property
    def name(self) -> str:
        """Short name used in logs (``train/kd/<name>``)."""
        return type(self).__name__.lower()

    def setup(self, info: SetupInfo) -> None:
        """Build connectors from the feature shapes; raise :class:`ConfigError` if they cannot fit."""

    def setup_data(self, num_indices: int) -> None:
        """Called before training with the size of the training set's index range (``uses_indices``)."""

    def setup_labels(self, labels: torch.Tensor) -> None:
        """Called before training (``uses_labels``) with the class of every index (-1: not a training sample)."""

    def resize_for_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Before a checkpoint is loaded: give data-sized buffers the checkpoint's shapes (``prefix`` = our keys')."""

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def _losses() -> dict[str, type[KDLoss]]:
    """Every public teacher-student subclass of :class:`KDLoss` in kd_lightning, by class name.

    These are the classes jsonargparse resolves a recipe's ``class_path: NAME`` against (it, too, walks the
    imported subclasses).
    """
    import kd_lightning.losses  # noqa: F401  (defines the built-in losses)

    found: dict[str, type[KDLoss]] = {}
    todo = list(KDLoss.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__module__.startswith("kd_lightning.") or cls.__name__.startswith("_") or not cls.for_distill:
            continue
        if found.setdefault(cls.__name__, cls) is not cls:
            raise ValueError(f"two KD losses are named {cls.__name__!r}: {found[cls.__name__]} and {cls}")
    return found


def list_losses() -> list[str]:
    """Names of the KD losses (the subclasses of :class:`KDLoss` in kd_lightning)."""
    return sorted(_losses())


def get_loss(name: str) -> type[KDLoss]:
    """The loss class named ``name``; a clear error lists the known ones otherwise."""
    try:
        return _losses()[name]
    except KeyError:
        raise ConfigError(f"unknown KD loss {name!r}; expected one of: {', '.join(list_losses())}") from None


def require_shape(loss: KDLoss, side: str, shapes: dict[str, torch.Size], name: str, ndim: int) -> torch.Size:
    """The shape of feature ``name`` (without the batch axis), checking its rank."""
    if name not in shapes:
        raise ConfigError(f"{type(loss).__name__}: the {side} has no feature {name!r} (has: {', '.join(shapes)})")
    shape = shapes[name]
    if len(shape) != ndim:
        what = "C x H x W maps" if ndim == 3 else "flat vectors" if ndim == 1 else f"{ndim}-d features"
        raise ConfigError(f"{type(loss).__name__}: {side} feature {name!r} has shape {tuple(shape)}; expected {what}")
    return shape
