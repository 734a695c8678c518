"""GANs as LightningModules with manual optimisation, one family per module.

- :mod:`~kd_lightning.methods.gan.base` — :class:`GANTask`, the shared adversarial loop, EMA generator and DiffAugment;
- :mod:`~kd_lightning.methods.gan.image` — :class:`ConditionalGAN` (class-conditional) and :class:`DCGAN`;
- :mod:`~kd_lightning.methods.gan.ccgan` — :class:`CcGAN` (continuous labels) and :class:`LabelEmbedding`.

Loading a trained GAN is :func:`kd_lightning.loading.load_gan`; its names are re-exported here, where they were.
"""

from kd_lightning.loading import load_gan, load_label_embedding
from kd_lightning.methods.gan.base import GANTask, gan_adam
from kd_lightning.methods.gan.ccgan import CcGAN, LabelEmbedding
from kd_lightning.methods.gan.image import DCGAN, ConditionalGAN

__all__ = [
    "DCGAN",
    "CcGAN",
    "ConditionalGAN",
    "GANTask",
    "LabelEmbedding",
    "gan_adam",
    "load_gan",
    "load_label_embedding",
]
