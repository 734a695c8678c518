"""Generators and discriminators (plain ``nn.Module``s, no Lightning), DiffAugment, GAN losses, AI-KD's critic."""

from kd_lightning.gans.base import Generator, labels_per_class
from kd_lightning.gans.critic import LogitCritic, adversarial_loss, critic_scores, wgan_gp_critic_parts
from kd_lightning.gans.dcgan import DCGANDiscriminator, DCGANGenerator
from kd_lightning.gans.diffaugment import DiffAugment, diff_augment
from kd_lightning.gans.embedding import EmbeddingRegressor, LabelToEmbedding
from kd_lightning.gans.losses import (
    VicinalSampler,
    d_loss_parts,
    g_loss,
    kappa_base,
    rule_of_thumb_sigma,
    vicinal_weights,
)
from kd_lightning.gans.mekd import MEKDDiscriminator, MEKDGenerator
from kd_lightning.gans.resnet import ResNetDiscriminator, ResNetGenerator

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DiffAugment",
    "EmbeddingRegressor",
    "Generator",
    "LabelToEmbedding",
    "LogitCritic",
    "MEKDDiscriminator",
    "MEKDGenerator",
    "ResNetDiscriminator",
    "ResNetGenerator",
    "VicinalSampler",
    "adversarial_loss",
    "critic_scores",
    "d_loss_parts",
    "diff_augment",
    "g_loss",
    "kappa_base",
    "labels_per_class",
    "rule_of_thumb_sigma",
    "vicinal_weights",
    "wgan_gp_critic_parts",
]
