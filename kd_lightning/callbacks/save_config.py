"""Saving the parsed config beside a run, without letting a test replace the config of the fit it tests."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback


class SaveRunConfig(SaveConfigCallback):
    """Lightning's config saving, except that validate/test/predict never overwrite a ``config.yaml`` already there.

    Without a logger (``trainer.logger: false``) the log folder is the run folder itself, so ``kdl test`` into a
    fit's folder (a pipeline's test stage) would replace the fit's ``config.yaml``, the record of how its checkpoint
    was trained. Such a run saves ``config.<stage>.yaml`` (``config.test.yaml``) beside it instead.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" and not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir
            if log_dir is not None and os.path.isfile(os.path.join(log_dir, self.config_filename)):
                self.config_filename = f"config.{getattr(stage, 'value', stage)}.yaml"  # stage: a TrainerFn
        super().setup(trainer, pl_module, stage)
