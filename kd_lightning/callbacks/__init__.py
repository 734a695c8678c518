"""Callbacks shared by every method."""

from kd_lightning.callbacks.throughput import TrainThroughput

__all__ = ["TrainThroughput"]
