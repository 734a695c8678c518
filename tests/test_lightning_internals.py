"""The few private Lightning hooks kd_lightning relies on, checked by name and signature, so that a Lightning
upgrade that changes them fails here, loudly, instead of silently changing checkpointing or hyper-parameters.

pyproject.toml pins Lightning to the range these were checked against. Where a public hook exists, the package
uses it instead (``save_hyperparameters(ignore=...)`` through ``BaseTask.hparams_ignore``).
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.mixins import hparams_mixin

from kd_lightning.methods import ImageClassifier, SelfKD
from kd_lightning.methods.gan import ConditionalGAN
from tests.helpers import DIGITS_STUDENT, QUIET_TRAINER

#: ModelCheckpoint's private methods that KDCheckpoint (kd_lightning/callbacks/checkpoint.py) calls or overrides,
#: with their parameters
MODEL_CHECKPOINT_HOOKS = {
    "_save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
    "_should_skip_saving_checkpoint": ["self", "trainer"],
    "_should_save_on_train_epoch_end": ["self", "trainer"],
    "_monitor_candidates": ["self", "trainer"],
}


@pytest.mark.parametrize("name", sorted(MODEL_CHECKPOINT_HOOKS))
def test_model_checkpoint_private_hooks_are_unchanged(name: str) -> None:
    hook = getattr(ModelCheckpoint, name, None)
    assert callable(hook), f"Lightning {L.__version__}: ModelCheckpoint.{name} is gone; KDCheckpoint needs a rewrite"
    params = list(inspect.signature(hook).parameters)
    assert params == MODEL_CHECKPOINT_HOOKS[name], f"Lightning {L.__version__}: ModelCheckpoint.{name}{params}"


def test_the_training_loop_privates_the_callbacks_read_are_unchanged() -> None:
    """GracefulStop asks the epoch loop whether validation follows a batch (callbacks/interrupt.py), and GANQuality
    logs at the loop's own batch count (callbacks/gan_quality.py); both fall back quietly, so check them here."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    hook = getattr(_TrainingEpochLoop, "_should_check_val_fx", None)
    assert callable(hook), f"Lightning {L.__version__}: _TrainingEpochLoop._should_check_val_fx is gone"
    assert list(inspect.signature(hook).parameters) == ["self", "data_fetcher"], (
        f"Lightning {L.__version__}: _should_check_val_fx{inspect.signature(hook)}"
    )
    assert "_batches_that_stepped" in inspect.getsource(_TrainingEpochLoop.__init__)


def test_given_hyperparameters_is_still_a_context_variable() -> None:
    """``load_gan`` clears it while a GAN loads inside another module's ``__init__`` (kd_lightning/loading.py)."""
    assert isinstance(getattr(hparams_mixin, "_given_hyperparameters", None), ContextVar)


def test_hparams_initial_is_where_lightning_keeps_the_logged_copy() -> None:
    """MEKDDeprivatization writes its resolved ``z_dim`` there too (kd_lightning/methods/mekd.py)."""
    model = ImageClassifier(net="tinynet", num_classes=3, in_channels=1)
    assert model.hparams_initial == model._hparams_initial and model._hparams_initial["num_classes"] == 3
    model._hparams_initial["num_classes"] = 4
    assert model.hparams_initial["num_classes"] == 4


def test_optimiser_factories_are_not_hyper_parameters() -> None:
    """The public route for callables: ``save_hyperparameters(ignore=cls.hparams_ignore)``."""
    gan = ConditionalGAN(num_classes=3, in_channels=1, image_size=16, g_ch=4, d_ch=4, z_dim=8)
    selfkd = SelfKD(net="tinynet", num_classes=3, in_channels=1)
    for model in (gan, selfkd, ImageClassifier(net="tinynet", num_classes=3)):
        for hp in (model.hparams, model.hparams_initial):
            assert not set(hp) & set(type(model).hparams_ignore), type(model).__name__
    assert {"generator_optimizer", "discriminator_optimizer"} <= set(ConditionalGAN.hparams_ignore)
    assert "critic_optimizer" in SelfKD.hparams_ignore


def test_the_cli_path_leaves_the_factories_out_too(kdl, tmp_path: Path) -> None:
    """Under kdl, Lightning hands the config to save_hyperparameters (the context variable above); the
    ignore list applies there as well: the checkpoint's hyper-parameters hold no optimiser."""
    import torch

    args = ["--model.init_args.net", "tinynet", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"]
    assert kdl("fit", "--config", str(DIGITS_STUDENT), *args, *QUIET_TRAINER, "--trainer.default_root_dir", "r") == 0
    hp = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert hp["net"] == "tinynet" and not {"optimizer", "lr_scheduler"} & set(hp)
