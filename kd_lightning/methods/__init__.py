"""LightningModules, one per method family."""

from kd_lightning.methods.base import BaseTask, Normalize, default_optimizer
from kd_lightning.methods.gan import DCGAN, CcGAN, ConditionalGAN, GANTask, LabelEmbedding
from kd_lightning.methods.supervised import ImageClassifier, ImageRegressor, NetTask

__all__ = [
    "DCGAN",
    "BaseTask",
    "CcGAN",
    "ConditionalGAN",
    "GANTask",
    "ImageClassifier",
    "ImageRegressor",
    "LabelEmbedding",
    "NetTask",
    "Normalize",
    "default_optimizer",
]
