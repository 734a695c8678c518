"""Sample grids of a finished sample store, as PNGs in the store folder, so a run can be looked at without a notebook.

:func:`write_store_grids` draws one grid per kind of sample: ``kept`` (what the student trains on), ``dropped``
(accepted by cDR-RS, dropped by the teacher's filter) and ``rejected`` (refused by cDR-RS; in the store only
with ``keep_rejected``). A class-conditional store gets one row per class; a regression store one row per tenth
of the label range, each row's label range written beside it. ``kdl generate`` writes them into
``<store>/grids/`` when it finishes a store; ``notebooks/explore_samples`` draws the same grids and more.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from kd_lightning.fileio import atomic_write_bytes
from kd_lightning.sampling.store import SampleStore

KINDS = ("kept", "dropped", "rejected")


def _rows(labels: np.ndarray, task: str, n_rows: int) -> tuple[np.ndarray, list[str]]:
    """Row index of every sample and the row names: one row per class, or per label bin for regression."""
    if task == "classification":
        classes = sorted(int(c) for c in np.unique(labels))
        row_of = {c: r for r, c in enumerate(classes)}
        return np.array([row_of[int(c)] for c in labels], dtype=np.int64), [str(c) for c in classes]
    edges = np.linspace(0.0, 1.0, n_rows + 1)
    rows = np.clip(np.searchsorted(edges, labels.astype(np.float64), side="right") - 1, 0, n_rows - 1)
    return rows, [f"{edges[r]:.1f}-{edges[r + 1]:.1f}" for r in range(n_rows)]


def grid_image(images: np.ndarray, rows: np.ndarray, mask: np.ndarray, n_rows: int, per_row: int) -> np.ndarray:
    """uint8 H x W (x C) canvas: row r holds the first ``per_row`` images of row r selected by ``mask`` (white else)."""
    _, ch, h, w = images.shape
    canvas = np.full((n_rows * h, per_row * w, ch), 255, np.uint8)
    for r in range(n_rows):
        for k, i in enumerate(np.flatnonzero(mask & (rows == r))[:per_row]):
            canvas[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i].transpose(1, 2, 0)
    return canvas[..., 0] if ch == 1 else canvas


def _png(canvas: np.ndarray, row_names: list[str], title: str, row_height: int) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone

    fig = Figure(figsize=(max(3.0, canvas.shape[1] / 28 + 1.2), max(2.0, canvas.shape[0] / 28 + 0.8)))
    ax = fig.subplots()
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([(r + 0.5) * row_height for r in range(len(row_names))], row_names, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


def write_store_grids(store: SampleStore, per_row: int = 10, n_rows: int = 10) -> list[Path]:
    """Write ``<store>/grids/{kept,dropped,rejected}.png`` (kinds with no sample are left out); returns the paths.

    Args:
        store: a finished store.
        per_row: images per row.
        n_rows: regression stores: the number of label bins (rows).
    """
    table = store.table()
    labels = np.asarray(table["label"])
    if len(labels) == 0:
        return []
    task = str(store.settings.get("task", "classification"))
    images = store.load_images(verify=False)  # table() checked the table; shards were checked when written
    accepted, kept = np.asarray(table["accepted"]).astype(bool), np.asarray(table["kept"]).astype(bool)
    rows, names = _rows(labels, task, n_rows)
    masks = {"kept": kept, "dropped": accepted & ~kept, "rejected": ~accepted}
    what = "class" if task == "classification" else "label (normalised)"
    folder = Path(store.root) / "grids"
    written = []
    for kind in KINDS:
        mask = masks[kind]
        if not mask.any():
            continue
        canvas = grid_image(images, rows, mask, len(names), per_row)
        title = f"{kind} ({int(mask.sum())} samples), one row per {what}"
        path = folder / f"{kind}.png"
        os.makedirs(folder, exist_ok=True)
        atomic_write_bytes(str(path), _png(canvas, names, title, images.shape[2]))
        written.append(path)
    return written


__all__ = ["KINDS", "grid_image", "write_store_grids"]
