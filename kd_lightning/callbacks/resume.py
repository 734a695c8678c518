"""What an exact resume needs beyond Lightning's own checkpoint: RNG states and the run's recipe.

Lightning restores weights, optimiser, schedulers, loop counters and (through
:class:`~kd_lightning.data.sampler.ResumableDataLoader`) the data position, but not the global
random number generators that data augmentation and dropout draw from. :class:`ResumeState` saves
the torch (CPU and CUDA), numpy and Python RNG states of every rank and puts them back when
training restarts; it also stores the model and data sections of the recipe, which ``kdl`` compares
with the resuming recipe (:func:`config_differences`).
"""

from __future__ import annotations

import random
from typing import Any, cast

import lightning as L
import numpy as np
import torch

from kd_lightning.checkpoints import CONFIG_KEY, RNG_KEY

#: recipe keys that may change between an interrupted run and its resumption
RESUME_IGNORED_KEYS = ("data.init_args.num_workers", "data.init_args.root", "data.init_args.eval_batch_size")


def rng_states() -> dict[str, Any]:
    """Return the current torch, CUDA, numpy and Python RNG states of this process.

    Tensors and plain values only, so that Lightning's ``weights_only`` checkpoint loading accepts them.
    """
    name, keys, pos, has_gauss, gauss = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Put back states returned by :func:`rng_states`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Save the RNG states (all ranks) and the recipe in checkpoints; restore the RNGs at restart.

    The states are put back in ``on_train_start``: after the sanity check and the creation of the
    training data iterator, right before the first resumed batch, which is the point where the
    uninterrupted run was when the checkpoint was written (the checkpoint is written after a batch
    or at validation end, and nothing draws random numbers between there and the next batch).

    Args:
        config: the model and data sections of the recipe (``kdl`` fills it in).
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = rng_states()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint[RNG_KEY] = {"per_rank": gathered}
        else:
            checkpoint[RNG_KEY] = {"per_rank": [states]}
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        per_rank = (checkpoint.get(RNG_KEY) or {}).get("per_rank") or []
        if per_rank:
            self._pending = per_rank[trainer.global_rank] if trainer.global_rank < len(per_rank) else per_rank[0]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


def flatten(tree: object, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists as ``{"a.b.0": leaf}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = RESUME_IGNORED_KEYS
) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every recipe key that differs (``<missing>`` if absent)."""
    a, b = flatten(saved), flatten(current)
    missing = "<missing>"
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            diffs.append((key, va, vb))
    return diffs
