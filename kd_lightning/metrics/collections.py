"""Standard metric sets.

Classification: ``acc1`` (true top-1, ``average="micro"``; torchmetrics' default would average per
class), ``acc5``, macro ``f1``, and ``ece`` (15 equal-width bins, L1). Regression: ``mae`` and
``rmse`` in the dataset's original units (the model de-normalises before updating).
"""

from __future__ import annotations

from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassF1Score


def classification_metrics(num_classes: int, full: bool = True) -> MetricCollection:
    """``acc1`` always; with ``full``, also ``acc5``, ``f1`` (macro) and ``ece`` (15 bins)."""
    metrics: dict[str, Metric | MetricCollection] = {"acc1": MulticlassAccuracy(num_classes, average="micro")}
    if full:
        metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        metrics["f1"] = MulticlassF1Score(num_classes, average="macro")
        metrics["ece"] = MulticlassCalibrationError(num_classes, n_bins=15, norm="l1")
    return MetricCollection(metrics)


def regression_metrics() -> MetricCollection:
    """``mae`` and ``rmse``."""
    return MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)})
