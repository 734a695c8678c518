"""A trained generator used only for inference, frozen like :class:`~kd_lightning.teachers.FrozenTeacher`.

MEKD's stage 2 (and any black-box student given a ``generator``) makes its query images x' = G(z) with the
deprivatization stage's generator and back-propagates through it to its input; the generator's own weights never
change and it stays in eval mode, whatever the Trainer does to the parent module.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.errors import CheckpointError
from kd_lightning.gans import DCGANGenerator, Generator, MEKDGenerator


class FrozenGenerator(nn.Module):
    """A trained generator, frozen and always in eval mode; gradients still flow to its input."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.g = generator
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenGenerator:
        return super().train(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.g(z)


def load_frozen_generator(path: str, ema: bool = True) -> FrozenGenerator:
    """The (EMA) generator of a ``MEKDDeprivatization`` or ``DCGAN`` checkpoint, frozen.

    Rebuilt from the checkpoint's hyper-parameters alone (the teacher is not contacted).
    """
    ckpt = load_checkpoint(path)
    hp, state = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
    prefix = "generator_ema." if ema else "generator."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights or "z_dim" not in hp:
        raise CheckpointError(
            f"checkpoint {path!r} holds no {prefix.rstrip('.')} weights: it was not written by MEKDDeprivatization "
            "or DCGAN"
        )
    if hp.get("nets") == "official":
        g: Generator = MEKDGenerator(hp["z_dim"], hp["image_size"], hp["in_channels"], hp.get("official_width", 1.0))
    else:
        g = DCGANGenerator(hp["z_dim"], hp["image_size"], hp["in_channels"], hp.get("g_ch", 64))
    g.load_state_dict(weights)
    return FrozenGenerator(g)


__all__ = ["FrozenGenerator", "load_frozen_generator"]
