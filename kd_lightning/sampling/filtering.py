"""cGAN-KD's M2: filtering by the teacher's error (Algorithms 1 and 2) and label replacement.

Classification: the error of a sample is the cross-entropy between its assigned label and the
teacher's soft prediction; each class keeps the samples whose error is at most that class's
rho-quantile (rho = 0.9 by default). Regression: the error is |f_t(x) - y| and one global
rho-quantile (rho = 0.7) is the cut-off; replacement then sets the label to the teacher's
prediction. Quantiles are numpy's default (linear interpolation between order statistics), so with
n errors exactly ``ceil(rho * (n - 1)) + 1`` or so survive; ties at the cut-off are kept.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError


def check_rho(rho: float) -> None:
    """Raise ConfigError unless the quantile ``rho`` is in (0, 1]."""
    if not 0.0 < rho <= 1.0:
        raise ConfigError(f"rho={rho}; expected a quantile in (0, 1]")


def classification_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy between the assigned label and the teacher's soft prediction."""
    return F.cross_entropy(logits.float(), labels.long(), reduction="none")


def regression_errors(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample |f_t(x) - y| (normalised units)."""
    return (predictions.float().flatten() - labels.float().flatten()).abs()


def class_cutoffs(errors: np.ndarray, labels: np.ndarray, rho: float) -> dict[int, float]:
    """The rho-quantile of the errors within each class (Algorithm 1)."""
    check_rho(rho)
    return {int(c): float(np.quantile(errors[labels == c], rho)) for c in np.unique(labels)}


def global_cutoff(errors: np.ndarray, rho: float) -> float:
    """The rho-quantile of all errors (Algorithm 2)."""
    check_rho(rho)
    return float(np.quantile(errors, rho))


def keep_mask(errors: np.ndarray, labels: np.ndarray, cutoffs: dict[int, float] | float) -> np.ndarray:
    """True where the error is at most the (per-class or global) cut-off."""
    if isinstance(cutoffs, dict):
        limit = np.array([cutoffs[int(c)] for c in labels], dtype=np.float64)
    else:
        limit = np.full(len(errors), cutoffs, dtype=np.float64)
    return errors.astype(np.float64) <= limit


def histogram_png(
    errors: np.ndarray,
    labels: np.ndarray | None,
    cutoffs: dict[int, float] | float,
    title: str,
    xlabel: str,
    class_names: list[str] | None = None,
) -> bytes:
    """PNG bytes: histogram(s) of the errors with the cut-off line(s) (cGAN-KD Fig. 8).

    One panel per class when ``cutoffs`` is per class, else one panel.
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    if isinstance(cutoffs, dict):
        classes = sorted(cutoffs)
        cols = min(5, len(classes))
        rows = (len(classes) + cols - 1) // cols
        fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, c in zip(axes.flat, classes):
            e = errors[labels == c]
            ax.hist(e, bins=40, color="0.55")
            ax.axvline(cutoffs[c], color="red", lw=1.5)
            name = class_names[c] if class_names and c < len(class_names) else f"class {c}"
            ax.set_title(f"{name} (cut-off {cutoffs[c]:.3g})", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(classes) :]:
            ax.axis("off")
        fig.supxlabel(xlabel, fontsize=9)
    else:
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        ax.hist(errors, bins=60, color="0.55")
        ax.axvline(cutoffs, color="red", lw=1.5, label=f"cut-off {cutoffs:.3g}")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


__all__ = [
    "check_rho",
    "class_cutoffs",
    "classification_errors",
    "global_cutoff",
    "histogram_png",
    "keep_mask",
    "regression_errors",
]
