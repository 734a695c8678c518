"""cGAN-KD's M2: filtering by the teacher's error (Algorithms 1 and 2) and label replacement.

Classification: the error of a sample is the cross-entropy between its assigned label and the
teacher's soft prediction; each class keeps the samples whose error is at most that class's
rho-quantile (rho = 0.9 by default). Regression: the error is |f_t(x) - y| and one global
rho-quantile (rho = 0.7) is the cut-off; replacement then sets the label to the teacher's
prediction. Quantiles are numpy's default (linear interpolation between order statistics), so with
n errors exactly ``ceil(rho * (n - 1)) + 1`` or so survive; ties at the cut-off are kept.

:func:`filter_and_relabel` runs all of M2 over a store's table (labels, accepted flags, teacher outputs) and
builds its report: plain arrays in, arrays and numbers out, no networks and no files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Literal

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


@dataclass
class M2Result:
    """What M2 decides for every row of a sample table, and its part of the store's report.

    ``kept``: accepted and (with filtering) within the cut-off; ``replaced``: kept rows whose label became the
    teacher's prediction; ``final_label``: the label training uses; ``cutoffs``: per class (classification),
    global (regression) or None without a teacher; ``report``: the cut-offs, label consistency before/after,
    drop rate per class and the counts, in the order the store's report lists them.
    """

    kept: np.ndarray
    replaced: np.ndarray
    final_label: np.ndarray
    cutoffs: dict[int, float] | float | None
    report: dict[str, Any] = field(default_factory=dict)


def filter_and_relabel(
    labels: np.ndarray | torch.Tensor,
    accepted: np.ndarray | torch.Tensor,
    teacher: np.ndarray | torch.Tensor | None = None,
    errors: np.ndarray | torch.Tensor | None = None,
    *,
    task: Literal["classification", "regression"] = "classification",
    rho: float = 0.9,
    filter: bool = True,
    replace: bool = False,
    label_scale: float = 1.0,
) -> M2Result:
    """cGAN-KD's M2 over a whole sample table: cut-offs, filtering, replacement and their report (no networks).

    Args:
        labels: the assigned labels (class ids, or labels normalised to [0, 1]).
        accepted: True for samples cDR-RS accepted (rejected ones are never kept nor counted).
        teacher: the teacher's outputs (N x C logits, or N predictions); None = no teacher: nothing filtered,
            nothing replaced, no cut-off.
        errors: the teacher's per-sample errors (:func:`classification_errors` / :func:`regression_errors`);
            computed from ``teacher`` when not given.
        task: ``classification`` (per-class cut-offs, agreement of argmax and label) or ``regression`` (one
            global cut-off, teacher MAE).
        rho: the quantile of the cut-off(s) (quantiles over the accepted samples only).
        filter: drop samples above the cut-off (else the cut-offs are only reported).
        replace: kept samples take the teacher's label (argmax; regression: its prediction clipped to [0, 1]).
        label_scale: regression: the label range's width, so the reported teacher MAE is in label units.
    """
    labels, accepted = np.asarray(labels), np.asarray(accepted).astype(bool)
    kept = accepted.copy()
    report: dict[str, Any] = {}
    cutoffs: dict[int, float] | float | None = None
    if teacher is not None:
        t = np.asarray(teacher)
        if errors is None:
            compute = classification_errors if task == "classification" else regression_errors
            errors = compute(torch.as_tensor(t), torch.as_tensor(labels))
        err = np.asarray(errors).astype(np.float64)
        if task == "classification":
            cutoffs = per_class = class_cutoffs(err[accepted], labels[accepted], rho)
            report["cutoffs"] = {str(k): v for k, v in per_class.items()}
        else:
            cutoffs = global_cutoff(err[accepted], rho)
            report["cutoff"] = cutoffs
        if filter:
            kept = accepted & keep_mask(err, labels, cutoffs)
        report.update(_consistency(t, labels, accepted, kept, task, label_scale))
        replaced = kept & replace
    else:
        replaced = np.zeros_like(kept)
    final = labels.copy()
    if replaced.any():
        assert teacher is not None  # replaced is all False without a teacher
        t = np.asarray(teacher)
        final[replaced] = t[replaced].argmax(1) if task == "classification" else np.clip(t[replaced].reshape(-1), 0, 1)
    if task == "classification":
        report["drop_rate_per_class"] = {
            str(int(c)): float(1 - kept[accepted & (labels == c)].mean()) for c in np.unique(labels[accepted])
        }
    report["n_accepted"], report["n_kept"] = int(accepted.sum()), int(kept.sum())
    return M2Result(kept, replaced, final, cutoffs, report)


def _consistency(
    teacher: np.ndarray, labels: np.ndarray, accepted: np.ndarray, kept: np.ndarray, task: str, label_scale: float
) -> dict[str, float]:
    """Paper Table 6: how often the teacher agrees with the label (classification) or its MAE (regression)."""
    if task == "classification":
        agree = teacher.argmax(1) == labels
        return {
            "label_consistency_before": float(agree[accepted].mean()),
            "label_consistency_after": float(agree[kept].mean()) if kept.any() else float("nan"),
        }
    err = np.abs(teacher.reshape(-1) - labels)
    return {
        "teacher_mae_before": float(err[accepted].mean() * label_scale),
        "teacher_mae_after": float(err[kept].mean() * label_scale) if kept.any() else float("nan"),
    }


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
    "M2Result",
    "check_rho",
    "class_cutoffs",
    "classification_errors",
    "filter_and_relabel",
    "global_cutoff",
    "histogram_png",
    "keep_mask",
    "regression_errors",
]
