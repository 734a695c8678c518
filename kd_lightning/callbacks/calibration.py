"""Temperature scaling at test time: fit T on the validation split, report calibration on test.

Add it to a recipe (``trainer.callbacks: [{class_path: kd_lightning.callbacks.TemperatureScaling}]``)
and run ``kdl test --ckpt_path .../best.ckpt``: before the test loop it runs the model over the
DataModule's *validation* loader and fits T there (the test split is never used for fitting); during
the test loop it keeps the logits the model returns; at the end it logs ``test/top1_err``,
``test/top5_err``, ``test/ece_ts``, ``test/nll_ts``, ``test/temperature`` (fractions, like
``test/acc1``), writes
``calibration.json`` and ``reliability.png`` (before/after TS) into the run's log folder, and sends
the diagram to W&B when a ``WandbLogger`` is attached. ``fit`` is untouched.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kd_lightning.metrics.calibration import calibration_report, plot_reliability_diagram, report_lines
from kd_lightning.wandb_media import log_image, log_table


class TemperatureScaling(L.Callback):
    """Fit a temperature on validation logits at test start; report test metrics before and after it.

    Args:
        n_bins: ECE / reliability-diagram bins (15, as in the AI-KD paper's ECE).
        output_dir: where ``calibration.json`` and ``reliability.png`` go (default: the trainer's
            ``log_dir``, else ``default_root_dir``).
        plot: write the reliability diagram.
    """

    def __init__(self, n_bins: int = 15, output_dir: str | None = None, plot: bool = True) -> None:
        super().__init__()
        self.n_bins, self.output_dir, self.plot = n_bins, output_dir, plot
        self.report: dict[str, float] | None = None
        self._hook: RemovableHandle | None = None
        self._last: torch.Tensor | None = None
        self._test_logits: list[torch.Tensor] = []
        self._test_labels: list[torch.Tensor] = []
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ validation logits
    @torch.no_grad()
    def _validation_logits(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError("TemperatureScaling needs a DataModule with a validation split")
        if getattr(dm, "val_dataset", None) is None:
            dm.setup("validate")
        loader = dm.val_dataloader()
        logits, labels = [], []
        for batch in loader or []:
            image = batch["image"].to(pl_module.device)
            with trainer.precision_plugin.forward_context():
                logits.append(pl_module(image).float())
            labels.append(batch["label"].to(pl_module.device))
        if not logits:
            raise RuntimeError("TemperatureScaling: the validation split is empty (val_fraction 0?)")
        # this loop is not sharded (every rank sees the whole validation split): nothing to gather
        return torch.cat(logits).cpu(), torch.cat(labels).cpu()

    @staticmethod
    def _gather(pl_module: L.LightningModule, t: torch.Tensor) -> torch.Tensor:
        if pl_module.trainer.world_size > 1:  # each rank holds its shard of the test split; rank 0 needs them all
            t = cast(torch.Tensor, pl_module.all_gather(t))
            t = t.reshape(-1, *t.shape[2:])
        return t.cpu()

    # ------------------------------------------------------------------ hooks
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_logits, self._test_labels, self.report = [], [], None
        try:
            self._val = self._validation_logits(trainer, pl_module)
        except RuntimeError as e:
            warnings.warn(f"{e}; no temperature scaling for this test", stacklevel=1)
            self._val = None
            return

        def keep(_module: nn.Module, _inputs: tuple[object, ...], output: object) -> None:
            if isinstance(output, torch.Tensor):
                self._last = output.detach()

        self._hook = pl_module.register_forward_hook(keep)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,  # noqa: ANN401 - Lightning's hook signature
        batch: Any,  # noqa: ANN401 - Lightning's hook signature
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._hook is None or self._last is None:
            return
        self._test_logits.append(self._last.float())
        self._test_labels.append(batch["label"])
        self._last = None

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is None or self._val is None or not self._test_logits:
            return
        logits = self._gather(pl_module, torch.cat(self._test_logits))
        labels = self._gather(pl_module, torch.cat(self._test_labels))
        self.report = calibration_report(*self._val, logits, labels, n_bins=self.n_bins)
        r = self.report
        pl_module.log_dict(  # fractions, like test/acc1 and test/ece (calibration.json has percentages)
            {
                "test/top1_err": r["top1_error"] / 100,
                "test/top5_err": r["top5_error"] / 100,
                "test/ece_ts": r["ece_ts"] / 100,
                "test/nll": r["nll"],
                "test/nll_ts": r["nll_ts"],
                "test/temperature": r["temperature"],
            }
        )
        if trainer.is_global_zero:
            out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "calibration.json").write_text(json.dumps(r, indent=2) + "\n")
            rows = per_class_accuracy(logits, labels)
            (out / "per_class_accuracy.csv").write_text(
                "class,accuracy,n\n" + "".join(f"{c},{a:.6f},{n}\n" for c, a, n in rows)
            )
            self._log_table(trainer, rows)
            print(f"calibration ({out / 'calibration.json'}): {report_lines(r)}")
            if self.plot:
                png = plot_reliability_diagram(
                    logits,
                    labels,
                    r["temperature"],
                    out / "reliability.png",
                    n_bins=self.n_bins,
                    title=type(pl_module).__name__,
                )
                self._log_image(trainer, png)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @staticmethod
    def _log_table(trainer: L.Trainer, rows: list[tuple[int, float, int]]) -> None:
        log_table(trainer, "test/per_class_accuracy", ["class", "accuracy", "n"], [list(r) for r in rows])

    @staticmethod
    def _log_image(trainer: L.Trainer, png: Path) -> None:
        log_image(trainer, "test/reliability", png)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, float, int]]:
    """``(class, top-1 accuracy, test images)`` for every class present in ``labels``."""
    correct = logits.argmax(1) == labels
    return [
        (int(c), float(correct[labels == c].float().mean()), int((labels == c).sum()))
        for c in labels.unique().sort()[0]
    ]


__all__ = ["TemperatureScaling", "per_class_accuracy"]
