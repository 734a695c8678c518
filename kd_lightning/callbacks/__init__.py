"""Callbacks: exact resume, interruption, NaN guard, checkpoints, throughput, GAN quality, calibration, compile.

kdl adds the first five (resume, interruption, NaN guard, atomic checkpoints, :class:`KDCheckpoint`) to every fit.
"""

from kd_lightning.callbacks.calibration import TemperatureScaling
from kd_lightning.callbacks.checkpoint import KDCheckpoint, named_checkpoint, resolve_ckpt_path
from kd_lightning.callbacks.checkpoint_io import AtomicCheckpointIO
from kd_lightning.callbacks.compile import Compile
from kd_lightning.callbacks.gan_quality import GANQuality
from kd_lightning.callbacks.generator_gate import GateFailed, GeneratorGate
from kd_lightning.callbacks.interrupt import EXIT_SIGTERM, GracefulStop, exit_status_after_stop, last_checkpoint_path
from kd_lightning.callbacks.nan_guard import NaNGuard, NonFiniteLossError
from kd_lightning.callbacks.plots import Curves
from kd_lightning.callbacks.resume import ResumeState, config_differences, rng_states, set_rng_states
from kd_lightning.callbacks.throughput import TrainThroughput

__all__ = [
    "EXIT_SIGTERM",
    "AtomicCheckpointIO",
    "Compile",
    "Curves",
    "GANQuality",
    "GateFailed",
    "GeneratorGate",
    "GracefulStop",
    "KDCheckpoint",
    "NaNGuard",
    "NonFiniteLossError",
    "ResumeState",
    "TemperatureScaling",
    "TrainThroughput",
    "config_differences",
    "exit_status_after_stop",
    "last_checkpoint_path",
    "named_checkpoint",
    "resolve_ckpt_path",
    "rng_states",
    "set_rng_states",
]
