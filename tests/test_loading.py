"""The loading layer (kd_lightning/loading.py): trained GANs rebuilt from checkpoints without importing methods/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import CheckpointError
from kd_lightning.loading import is_gan, load_gan
from tests.helpers import tiny_gan, tiny_teacher


@pytest.mark.parametrize("regression", [False, True])
def test_load_gan_rebuilds_the_class_its_checkpoint_names(tmp_path: Path, regression: bool) -> None:
    from kd_lightning.methods.gan import CcGAN, ConditionalGAN

    path = tiny_gan(tmp_path / "gan.ckpt", regression=regression)
    saved = torch.load(path, weights_only=False)["state_dict"]
    gan = load_gan(path)
    assert type(gan) is (CcGAN if regression else ConditionalGAN)
    assert is_gan(gan) and not gan.training
    assert all(torch.equal(v, saved[k]) for k, v in gan.state_dict().items())


def test_load_gan_refuses_a_classifier_checkpoint_naming_its_class(tmp_path: Path) -> None:
    path = tiny_teacher(tmp_path / "teacher.ckpt")
    with pytest.raises(CheckpointError, match=r"written by kd_lightning\.methods\.supervised\.ImageClassifier, not by"):
        load_gan(path)
    assert not is_gan(torch.nn.Linear(1, 1))


def test_the_old_import_paths_still_work() -> None:
    from kd_lightning.methods.density_ratio import DensityRatioModel, load_density_ratio
    from kd_lightning.methods.distill import num_indices
    from kd_lightning.methods.gan import load_gan as old_load_gan
    from kd_lightning.methods.gan import load_label_embedding
    from kd_lightning.sampling.density_ratio import DensityRatioModel as Model
    from kd_lightning.sampling.density_ratio import load_density_ratio as new_load_dr

    assert old_load_gan is load_gan and load_density_ratio is new_load_dr and DensityRatioModel is Model
    assert load_label_embedding.__module__ == "kd_lightning.loading"
    assert num_indices.__module__ == "kd_lightning.data.utils"


def test_the_layers_below_methods_load_without_it() -> None:
    """Importing the loading layer, the generated DataModules, kdl generate and the GAN callback loads no method."""
    code = (
        "import sys, kd_lightning.loading, kd_lightning.data.generated, kd_lightning.sampling.generate, "
        "kd_lightning.sampling.density_ratio, kd_lightning.callbacks.gan_quality;"
        "print(sorted(m for m in sys.modules if m.startswith('kd_lightning.methods')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
