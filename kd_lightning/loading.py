"""Trained models rebuilt from ``kdl fit`` checkpoints, for the layers below ``methods/``.

A DataModule that draws images from a GAN, ``kdl generate``/``kdl sample`` and the GAN-quality callback need a
trained GAN, not the code that trains it: :func:`load_gan` finds the class its checkpoint names (its
``_class_path``) and rebuilds it, so nothing here imports :mod:`kd_lightning.methods`. A CcGAN's label
embedding (:func:`load_label_embedding`) is read the same way. The density-ratio model of cDR-RS has its
loader beside it, :func:`kd_lightning.sampling.density_ratio.load_density_ratio`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import TYPE_CHECKING, Any, TypeGuard

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

from kd_lightning.checkpoints import is_trusted, load_checkpoint
from kd_lightning.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from kd_lightning.methods.gan import GANTask


def is_gan(module: object) -> TypeGuard[GANTask]:
    """Whether ``module`` is a GAN task: a LightningModule with a ``sampler_generator``.

    :class:`~kd_lightning.methods.gan.GANTask` and its subclasses are; the check needs no import of them.
    """
    return isinstance(module, L.LightningModule) and callable(getattr(module, "sampler_generator", None))


def is_gan_class(cls: object) -> TypeGuard[type[GANTask]]:
    """:func:`is_gan` for a class."""
    return (
        isinstance(cls, type)
        and issubclass(cls, L.LightningModule)
        and callable(getattr(cls, "sampler_generator", None))
    )


def load_label_embedding(path: str | os.PathLike, embed_dim: int) -> dict[str, torch.Tensor]:
    """The label-to-embedding weights (``y2h``) of a ``LabelEmbedding`` checkpoint, for an ILI CcGAN."""
    if not os.path.isfile(path):
        raise CheckpointError(f"embedding_checkpoint {str(path)!r} not found; train it with a LabelEmbedding recipe")
    ckpt = load_checkpoint(path)
    state = {k[len("y2h.") :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("y2h.")}
    if not state:
        raise CheckpointError(f"{str(path)!r} holds no label embedding (y2h.*): it was not written by LabelEmbedding")
    dim = ckpt.get("hyper_parameters", {}).get("embed_dim")
    if dim is not None and dim != embed_dim:
        raise ConfigError(f"embedding_checkpoint has embed_dim={dim} but the CcGAN has embed_dim={embed_dim}")
    return state


def load_gan(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GANTask:
    """A trained GAN task (``ConditionalGAN``, ``CcGAN``, ``DCGAN``, ...) from its ``kdl fit`` checkpoint, in eval mode.

    An ILI CcGAN is rebuilt without its ``embedding_checkpoint``: the label embedding is in the checkpoint.
    """
    ckpt = load_checkpoint(path)
    hp = ckpt.get("hyper_parameters", {})
    class_path = str(hp.get("_class_path") or "")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not is_gan_class(cls):
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by {class_path or 'an unknown model'}, not by a GAN "
            "(ConditionalGAN, CcGAN or DCGAN)"
        )
    # an ILI CcGAN would load its label embedding from this other file: the checkpoint already holds it
    takes_embedding = "embedding_checkpoint" in inspect.signature(cls.__init__).parameters
    overrides: dict[str, Any] = {"embedding_checkpoint": None} if takes_embedding else {}
    # kdl's CLI hands the hyper-parameters of the module it is building to every save_hyperparameters
    # call made meanwhile (a context variable); a GAN loaded inside another module's __init__ (the
    # density-ratio model, a generated DataModule) must use its own checkpoint's instead (a private variable
    # with no public switch: tests/test_lightning_internals.py pins it)
    token = _given_hyperparameters.set(None)
    try:
        task = cls.load_from_checkpoint(
            os.fspath(path), map_location=map_location, weights_only=not is_trusted(path), **overrides
        )
    finally:
        _given_hyperparameters.reset(token)
    return task.eval()


__all__ = ["is_gan", "is_gan_class", "load_gan", "load_label_embedding"]
