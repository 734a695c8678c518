"""Metric collections shared by every method (torchmetrics under the hood)."""

from kd_lightning.metrics.collections import classification_metrics, regression_metrics

__all__ = ["classification_metrics", "regression_metrics"]
