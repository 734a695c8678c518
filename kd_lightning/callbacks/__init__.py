"""Callbacks ``kdl`` adds to every fit: exact resume, clean interruption, NaN guard, atomic checkpoints."""

from kd_lightning.callbacks.checkpoint_io import AtomicCheckpointIO
from kd_lightning.callbacks.interrupt import EXIT_SIGTERM, GracefulStop, last_checkpoint_path
from kd_lightning.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from kd_lightning.callbacks.resume import ResumeState, config_differences, rng_states, set_rng_states

__all__ = [
    "EXIT_SIGTERM",
    "AtomicCheckpointIO",
    "GracefulStop",
    "NaNGuard",
    "NonFiniteLossError",
    "ResumeState",
    "config_differences",
    "last_checkpoint_path",
    "rng_states",
    "set_rng_states",
]
