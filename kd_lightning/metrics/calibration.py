"""Calibration: temperature scaling, ECE, reliability diagrams, and the AI-KD paper's test metrics.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T > 0 fitted by LBFGS to
minimise the negative log-likelihood on the *validation* split; it never changes the top-1 label,
only the confidence. :func:`calibration_report` fits T on validation logits and reports, on the
test logits, top-1/top-5 error, macro-F1, NLL and ECE before and after scaling. ECE (15 equal-width
confidence bins, L1) is torchmetrics' ``multiclass_calibration_error``; :func:`reliability_bins`
gives the per-bin numbers the diagram draws (their weighted gap is the same ECE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_f1_score,
)

from kd_lightning.errors import ConfigError


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising ``NLL(softmax(logits / T), labels)`` (LBFGS on log T, in float64 on CPU)."""
    if len(logits) == 0:
        raise ConfigError("temperature scaling needs validation logits; the validation split is empty")
    # callable from a test loop (inference mode): plain tensors, gradients on
    with torch.inference_mode(False), torch.enable_grad():
        z, y = logits.detach().double().cpu().clone(), labels.detach().long().cpu().clone()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
    t = float(log_t.detach().exp())
    if not torch.isfinite(torch.tensor(t)) or t <= 0:
        return 1.0
    return t


def classification_summary(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """``top1_error``, ``top5_error`` (in %), macro ``f1``, ``ece`` (in %, ``n_bins`` bins) and ``nll``."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    c = logits.shape[-1]
    probs = logits.softmax(-1)
    return {
        "top1_error": 100.0 * (1.0 - float(multiclass_accuracy(probs, labels, c, average="micro"))),
        "top5_error": 100.0 * (1.0 - float(multiclass_accuracy(probs, labels, c, top_k=min(5, c), average="micro"))),
        "f1": float(multiclass_f1_score(probs, labels, c, average="macro")),
        "ece": 100.0 * float(multiclass_calibration_error(probs, labels, c, n_bins=n_bins, norm="l1")),
        "nll": float(F.cross_entropy(logits, labels)),
    }


def calibration_report(
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    n_bins: int = 15,
) -> dict[str, float]:
    """Test metrics before and after temperature scaling fitted on the validation logits.

    Keys: ``top1_error``, ``top5_error``, ``f1``, ``ece``, ``nll`` (test, unscaled), ``ece_ts``,
    ``nll_ts`` (test, scaled), ``temperature``, ``val_nll``, ``val_nll_ts``, ``n_val``, ``n_test``.
    """
    t = fit_temperature(val_logits, val_labels)
    out = classification_summary(test_logits, test_labels, n_bins)
    scaled = classification_summary(test_logits.float() / t, test_labels, n_bins)
    out.update(
        ece_ts=scaled["ece"],
        nll_ts=scaled["nll"],
        temperature=t,
        val_nll=float(F.cross_entropy(val_logits.float().cpu(), val_labels.long().cpu())),
        val_nll_ts=float(F.cross_entropy(val_logits.float().cpu() / t, val_labels.long().cpu())),
        n_val=float(len(val_labels)),
        n_test=float(len(test_labels)),
    )
    return out


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per confidence bin (equal width on [0, 1]): ``accuracy``, mean ``confidence``, ``count``, and ``ece``.

    Bins are ``[lo, hi)`` like torchmetrics' (a confidence of exactly 1 falls in the last bin).
    """
    probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    which = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(which, minlength=n_bins).float()
    acc = torch.bincount(which, weights=correct, minlength=n_bins) / count.clamp(min=1)
    mean_conf = torch.bincount(which, weights=conf, minlength=n_bins) / count.clamp(min=1)
    ece = ((acc - mean_conf).abs() * count).sum() / count.sum().clamp(min=1)
    return {"edges": edges, "accuracy": acc, "confidence": mean_conf, "count": count, "ece": ece}


def default_min_count(n: int) -> int:
    """The fewest samples a reliability bin needs for a bar: 0.5 % of ``n``, at least 1."""
    return max(1, round(0.005 * n))


def drawn_bins(count: torch.Tensor, min_count: int | None = None) -> torch.Tensor:
    """Which bins of a reliability diagram get a bar: those with at least ``min_count`` samples (default above)."""
    least = default_min_count(int(count.sum())) if min_count is None else min_count
    return (count >= least) & (count > 0)


def plot_reliability_diagram(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | None,
    path: str | os.PathLike,
    n_bins: int = 15,
    title: str = "",
    min_count: int | None = None,
) -> Path:
    """A PNG with one panel per setting (before and, with ``temperature``, after scaling).

    Each panel: accuracy per confidence bin (bars), the gap to the bin's mean confidence (red,
    hatched), the diagonal of perfect calibration, and the ECE in the corner; under it, how many
    samples each bin holds. Bins with fewer than ``min_count`` samples (default: 0.5 % of them, at
    least 1) get no bar: one sample's 0 or 1 says nothing about calibration. They still count in the ECE.
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    settings: list[tuple[str, torch.Tensor]] = [("before TS", logits.float())]
    if temperature is not None:
        settings.append((f"after TS (T = {temperature:.2f})", logits.float() / temperature))
    fig = Figure(figsize=(3.8 * len(settings), 4.8))
    axes = fig.subplots(2, len(settings), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for col, (name, z) in enumerate(settings):
        ax, hist = axes[0, col], axes[1, col]
        bins = reliability_bins(z.softmax(-1), labels, n_bins)
        width = 1.0 / n_bins
        centres = (bins["edges"][:-1] + width / 2).numpy()
        count = bins["count"].numpy()
        shown = drawn_bins(bins["count"], min_count).numpy()
        acc, conf = bins["accuracy"].numpy(), bins["confidence"].numpy()
        ax.bar(centres[shown], acc[shown], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(
            centres[shown],
            (conf - acc)[shown],
            bottom=acc[shown],
            width=width,
            edgecolor="red",
            color="tab:red",
            alpha=0.3,
            hatch="//",
            label="gap",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect")
        tiny = int(((count > 0) & ~shown).sum())
        least = default_min_count(int(count.sum())) if min_count is None else min_count
        note = f"\n{tiny} bin(s) under {least} samples not drawn" if tiny else ""
        ax.text(
            0.04,
            0.93,
            f"ECE {100 * float(bins['ece']):.2f}%{note}",
            transform=ax.transAxes,
            fontsize=8,
            va="top",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=name)
        hist.bar(
            centres, count, width=width, edgecolor="black", color=["tab:blue" if s else "lightgray" for s in shown]
        )
        hist.set(xlim=(0, 1), xlabel="confidence", ylabel="samples")
        hist.set_yscale("symlog", linthresh=10)
    if title:
        fig.suptitle(title, fontsize=10)
    # one legend under the panels: inside an axis it hides the bars it explains
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def report_lines(report: dict[str, Any]) -> str:
    """One human-readable line of a :func:`calibration_report`."""
    return (
        f"top-1 err {report['top1_error']:.2f}%  top-5 err {report['top5_error']:.2f}%  F1 {report['f1']:.4f}  "
        f"ECE {report['ece']:.2f}% -> {report['ece_ts']:.2f}% after TS (T={report['temperature']:.3f})"
    )


__all__ = [
    "calibration_report",
    "classification_summary",
    "drawn_bins",
    "fit_temperature",
    "plot_reliability_diagram",
    "reliability_bins",
    "report_lines",
]
