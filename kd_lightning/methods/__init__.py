"""LightningModules, one per method family."""

from kd_lightning.methods.base import BaseTask, Normalize, default_optimizer
from kd_lightning.methods.self_kd import AIKD, CSKD, PSKD, TFKD, SelfKD
from kd_lightning.methods.supervised import ImageClassifier, ImageRegressor, NetTask

__all__ = ["BaseTask", "ImageClassifier", "ImageRegressor", "NetTask", "Normalize", "default_optimizer"]
__all__ += ["AIKD", "CSKD", "PSKD", "SelfKD", "TFKD"]  # self-distillation (issue 6)
