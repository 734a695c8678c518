# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Compare runs
#
# Learning curves and a mean ± std table of several run folders (each a `trainer.default_root_dir` with its
# `lightning_logs/version_*/metrics.csv` and `config.yaml`), read with the same code as `kdl report`
# (`kd_lightning.report`): validation metrics are those of the epoch the checkpoint monitor picks (best
# `val/acc1`), test metrics the last ones logged. Nothing is trained; it works on any copy of the folders.
#
# Inputs (environment variables):
#
# - `KDL_RUN_DIRS`: comma-separated run folders or glob patterns (default `/work/runs/i15/evidence/*/seed*`, the
#   Fashion-MNIST students whose curves are committed here);
# - `KDL_GROUP_BY`: `parent` (the folder above `seed*`, the default), `method`, `none` or a dotted config key;
# - `KDL_METRICS`: comma-separated validation metrics to plot (default `val/acc1,val/loss,val/ece,val/f1`).
#
# The same table from a shell: `kdl report /work/runs/i15/evidence/*/seed* --group-by parent --out report.md`.
# `tests/test_notebooks.py` runs this notebook from its text twin (`compare_runs.py`) on fake run folders.

# %%
import glob
import os

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from kd_lightning.errors import KDLError
from kd_lightning.report import draw_curves, read_run, table

PATTERNS = os.environ.get("KDL_RUN_DIRS", "/work/runs/i15/evidence/*/seed*").split(",")
GROUP_BY = os.environ.get("KDL_GROUP_BY", "parent")
METRICS = os.environ.get("KDL_METRICS", "val/acc1,val/loss,val/ece,val/f1").split(",")

folders = sorted({f for p in PATTERNS for f in (sorted(glob.glob(p)) if glob.has_magic(p) else [p])})
runs, skipped = [], []
for folder in folders:
    try:
        runs.append(read_run(folder))
    except KDLError as e:  # e.g. a run still in progress, without metrics yet
        skipped.append(f"{folder}: {e}")
print(f"{len(runs)} runs read" + "".join(f"\nskipped {s}" for s in skipped))
for run in runs:
    best = run.selected.get("val/epoch")
    print(f"  {run.path}  {run.method()}  seed {run.seed}  best epoch {best:.0f}" if best is not None else run.path)

# %% [markdown]
# ## Learning curves (one colour per group)

# %%
metrics = [m for m in METRICS if any(r.curves.get(m) for r in runs)]
fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), 3.4), squeeze=False)
for ax, metric in zip(axes[0], metrics):
    draw_curves(ax, runs, GROUP_BY, metric)
    ax.set_title(metric, fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Mean ± std over seeds
#
# Validation metrics at the selected epoch and the test metrics (%, sample standard deviation over the runs of a
# group; one run shows its value alone).

# %%
summary = table(runs, GROUP_BY)
display(Markdown(summary))
