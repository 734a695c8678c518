# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explore a cGAN-KD sample store
#
# `kdl generate` (docs/cgankd.md) draws proposals from a class-conditional GAN, accepts them by cDR-RS
# (density ratio r(x|y) against the largest ratio M of a burn-in), lets the teacher filter the accepted ones
# (per class, drop the samples whose cross-entropy exceeds the rho-quantile) and writes everything to a sample
# store. This notebook opens a store through `kd_lightning.sampling.open_store` and shows
#
# - the store's own report: acceptance rate per class, drop rate, label consistency before and after filtering;
# - per class, samples that were kept, dropped by the filter and (when the store kept them) rejected by cDR-RS;
# - the density ratios of accepted vs rejected proposals, with each class's M;
# - the teacher's cross-entropy per class, kept vs dropped, with the cut-off (cGAN-KD Fig. 8).
#
# Inputs: the parameters cell below (papermill: `-p STORE runs/cgankd/digits/store`), or the environment
# variables of the same names with a `KDL_` prefix: `STORE` (`KDL_STORE`), the store folder (default
# `runs/cgankd/digits/store`, what `kdl pipeline --config recipes/cgankd/digits/pipeline.yaml` writes; a store
# written with `keep_rejected: true` also shows the rejected proposals); `GRID_N` (`KDL_GRID_N`), samples per class
# in the grids (default 10). A relative path is resolved against the project root (`$KDL_PROJECT_ROOT`, else this
# repository), not the kernel's folder; a folder without a store is an error that names it. The committed outputs
# are this notebook run with its defaults on the store of `kdl pipeline --config recipes/cgankd/digits/pipeline.yaml`
# (seeded: the same pipeline on a machine like this one gives the same store; 50 accepted samples per class).
# `tests/test_notebooks.py` runs this notebook with papermill, from another working directory, on a tiny store.

# %% tags=["parameters"]
import os

STORE = os.environ.get("KDL_STORE", "runs/cgankd/digits/store")
GRID_N = int(os.environ.get("KDL_GRID_N", "10"))

# %%
import matplotlib.pyplot as plt
import numpy as np

from kd_lightning.paths import project_root, resolve
from kd_lightning.sampling import open_store

store_dir = resolve(STORE)
if not (store_dir / "manifest.json").is_file():
    raise FileNotFoundError(
        f"no sample store at {str(store_dir)!r} (STORE={STORE!r}, relative paths resolved against {project_root()}); "
        "run the cGAN-KD pipeline (kdl pipeline --config recipes/cgankd/digits/pipeline.yaml) or set STORE / KDL_STORE"
    )
store = open_store(store_dir)  # a finished store; every shard and the table are checked against their SHA-256
table = store.table()
report = store.report
settings = store.settings
if settings["task"] != "classification":
    raise ValueError(f"{store_dir} holds a {settings['task']} store; this notebook explores class-conditional stores")
print(f"{STORE}: {len(table)} rows, task {settings['task']}, rho {settings['rho']}, seed {settings['seed']}")
print(f"columns: {', '.join(table.columns)}")

# %%
accepted, kept = table["accepted"].astype(bool), table["kept"].astype(bool)
labels = table["label"]
classes = sorted(int(c) for c in np.unique(labels))
units = report.get("units", {})
print(f"{'class':>5s} {'proposed':>9s} {'accepted':>9s} {'rate':>7s} {'M':>6s} {'kept':>5s} {'dropped':>8s}")
for c in classes:
    u = units.get(f"class-{c}", {})
    mask = labels == c
    print(
        f"{c:5d} {u.get('proposed', int(mask.sum())):9d} {int((accepted & mask).sum()):9d} "
        f"{100 * u.get('acceptance_rate', float('nan')):6.2f}% {u.get('max_ratio', float('nan')):6.2f} "
        f"{int((kept & mask).sum()):5d} {int((accepted & ~kept & mask).sum()):8d}"
    )
print(
    f"acceptance {100 * report.get('acceptance_rate', float('nan')):.2f}%, {report.get('n_accepted')} accepted -> "
    f"{report.get('n_kept')} kept; label consistency (teacher) {100 * report.get('label_consistency_before', 0):.1f}% "
    f"before filtering, {100 * report.get('label_consistency_after', 0):.1f}% after"
)

# %% [markdown]
# ## Class grids: kept, dropped by the filter, rejected by cDR-RS
#
# One row per class (Fashion-MNIST: T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, boot),
# the first `KDL_GRID_N` samples of each kind. Rejected proposals are in the store only when it was written with
# `keep_rejected: true`.

# %%
images = store.load_images()  # uint8, N x C x H x W, in table order


def class_grid(mask: np.ndarray) -> np.ndarray:
    """One row per class of the first GRID_N images selected by ``mask`` (blank where a class has fewer)."""
    _, ch, h, w = images.shape
    grid = np.full((len(classes) * h, GRID_N * w, ch), 255, np.uint8)
    for r, c in enumerate(classes):
        for k, i in enumerate(np.flatnonzero(mask & (labels == c))[:GRID_N]):
            grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i].transpose(1, 2, 0)
    return grid.squeeze(-1) if ch == 1 else grid


kinds = {"kept": kept, "dropped by the filter": accepted & ~kept, "rejected by cDR-RS": ~accepted}
kinds = {name: mask for name, mask in kinds.items() if mask.any()}
fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.6), squeeze=False)
for ax, (name, mask) in zip(axes[0], kinds.items()):
    ax.imshow(class_grid(mask), cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{name} ({int(mask.sum())})", fontsize=9)
    ax.set_yticks([(r + 0.5) * images.shape[2] for r in range(len(classes))], [str(c) for c in classes], fontsize=7)
    ax.set_xticks([])
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Density ratios (cDR-RS)
#
# A proposal x of class y is accepted with probability r(x|y)/M. Accepted proposals should sit at high ratios;
# the dashed line is the class's M (largest ratio of the burn-in).

# %%
ratio = table["ratio"].astype(np.float64)
cols = min(5, len(classes))
rows = (len(classes) + cols - 1) // cols
fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
for ax, c in zip(axes.flat, classes):
    mask = labels == c
    bins = np.linspace(0, max(float(ratio[mask].max()), 1e-6), 30)
    if (~accepted & mask).any():
        ax.hist(ratio[~accepted & mask], bins=bins, color="0.6", label="rejected")
    ax.hist(ratio[accepted & mask], bins=bins, color="tab:green", alpha=0.8, label="accepted")
    m = units.get(f"class-{c}", {}).get("max_ratio")
    if m is not None:
        ax.axvline(m, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_title(f"class {c}", fontsize=8)
    ax.tick_params(labelsize=7)
for ax in list(axes.flat)[len(classes) :]:
    ax.axis("off")
axes[0, 0].legend(fontsize=7)
fig.supxlabel("density ratio r(x|y)", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Teacher filtering (cGAN-KD Fig. 8)
#
# The error of an accepted sample is the cross-entropy between its assigned label and the teacher's soft
# prediction; the red line is the class's cut-off (its rho-quantile): samples above it are dropped.

# %%
error = table["error"].astype(np.float64)
cutoffs = {int(k): float(v) for k, v in (report.get("cutoffs") or {}).items()}
fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
for ax, c in zip(axes.flat, classes):
    mask = accepted & (labels == c)
    bins = np.linspace(0, max(float(error[mask].max()) if mask.any() else 1.0, 1e-6), 30)
    ax.hist(error[mask & kept], bins=bins, color="tab:blue", label="kept")
    ax.hist(error[mask & ~kept], bins=bins, color="tab:red", alpha=0.8, label="dropped")
    if c in cutoffs:
        ax.axvline(cutoffs[c], color="red", lw=1.5)
        ax.set_title(f"class {c} (cut-off {cutoffs[c]:.2f})", fontsize=8)
    ax.tick_params(labelsize=7)
for ax in list(axes.flat)[len(classes) :]:
    ax.axis("off")
axes[0, 0].legend(fontsize=7)
fig.supxlabel("teacher cross-entropy of the assigned label", fontsize=9)
fig.tight_layout()
plt.show()

# %%
# label consistency: how often the teacher's prediction is the assigned label, per class, before and after filtering
teacher_pred = table["teacher"].argmax(1) if table["teacher"].ndim == 2 else None
if teacher_pred is not None:
    consistency = {
        "accepted": [float((teacher_pred[accepted & (labels == c)] == c).mean()) for c in classes],
        "kept": [float((teacher_pred[kept & (labels == c)] == c).mean()) for c in classes],
    }
    fig, ax = plt.subplots(figsize=(7, 2.8))
    for k, (name, values) in enumerate(consistency.items()):
        ax.bar(np.arange(len(classes)) + (k - 0.5) * 0.4, [100 * v for v in values], 0.4, label=name)
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("assigned class")
    ax.set_ylabel("teacher agrees (%)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    plt.show()
