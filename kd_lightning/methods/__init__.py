"""LightningModules, one per method family."""

import kd_lightning.losses  # noqa: F401  (register KD losses for short class names in recipes)
from kd_lightning.methods.base import BaseTask, CosineLR, Normalize, default_optimizer
from kd_lightning.methods.blackbox_baselines import AL, AM, DAFL, DB3KD, KN
from kd_lightning.methods.density_ratio import DensityRatioEstimator
from kd_lightning.methods.distill import DistillModule
from kd_lightning.methods.gan import DCGAN, CcGAN, ConditionalGAN, GANTask, LabelEmbedding
from kd_lightning.methods.mekd import MEKD, BlackBoxKD, BlackBoxStudent, MEKDDeprivatization
from kd_lightning.methods.paraphraser import FTParaphraser
from kd_lightning.methods.self_kd import AIKD, SelfKD
from kd_lightning.methods.self_kd_baselines import CSKD, PSKD, TFKD
from kd_lightning.methods.sskd_head import SSKDTeacherHead
from kd_lightning.methods.supervised import ImageClassifier, ImageRegressor, NetTask

__all__ = [
    "AIKD",
    "AL",
    "AM",
    "CSKD",
    "DAFL",
    "DB3KD",
    "DCGAN",
    "KN",
    "MEKD",
    "PSKD",
    "TFKD",
    "BaseTask",
    "BlackBoxKD",
    "BlackBoxStudent",
    "CcGAN",
    "ConditionalGAN",
    "CosineLR",
    "DensityRatioEstimator",
    "DistillModule",
    "FTParaphraser",
    "GANTask",
    "ImageClassifier",
    "ImageRegressor",
    "LabelEmbedding",
    "MEKDDeprivatization",
    "NetTask",
    "Normalize",
    "SSKDTeacherHead",
    "SelfKD",
    "default_optimizer",
]
