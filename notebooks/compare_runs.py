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
# Inputs: the parameters cell below (papermill: `-p RUN_DIRS 'runs/demo/*'`), or the environment variables
# of the same names with a `KDL_` prefix:
#
# - `RUN_DIRS` (`KDL_RUN_DIRS`): comma-separated run folders or glob patterns (default `runs/demo/*`, what
#   `make demo` writes);
# - `GROUP_BY` (`KDL_GROUP_BY`): `method` (same recipe but the seed, the default), `run`, `parent`, `none` or a
#   dotted config key;
# - `METRICS` (`KDL_METRICS`): comma-separated validation metrics to plot (default `val/acc1,val/loss,val/ece,val/f1`).
#
# A relative path is resolved against the project root (`$KDL_PROJECT_ROOT`, else this repository), not the
# kernel's folder. No run found is an error that says where it looked. The same table from a shell:
# `kdl report runs/demo/* --out report.md`. `tests/test_notebooks.py` runs this notebook with papermill on run
# folders it makes, from another working directory.
#
# The committed outputs are this notebook run with its defaults after `make demo EPOCHS=3 TRAIN_SIZE=5000`.

# %% tags=["parameters"]
import os

RUN_DIRS = os.environ.get("KDL_RUN_DIRS", "runs/demo/*")
GROUP_BY = os.environ.get("KDL_GROUP_BY", "method")
METRICS = os.environ.get("KDL_METRICS", "val/acc1,val/loss,val/ece,val/f1")

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from kd_lightning.errors import KDLError
from kd_lightning.paths import expand, project_root
from kd_lightning.report import draw_curves, is_run_folder, read_run, table

ROOT = project_root()
folders = expand(RUN_DIRS)
runs, skipped = [], []
for folder in folders:
    if not is_run_folder(folder):  # a store, a notes folder, a path that does not exist
        skipped.append(f"{folder}: not a run folder (no lightning_logs)")
        continue
    try:
        runs.append(read_run(folder))
    except KDLError as e:  # e.g. a run still in progress, without metrics yet
        skipped.append(f"{folder}: {e}")
if not runs:
    raise FileNotFoundError(
        f"no run read from RUN_DIRS={RUN_DIRS!r} (relative paths resolved against {ROOT}): "
        f"{len(folders)} path(s) matched, {len(skipped)} skipped. Run `make demo`, or set RUN_DIRS / KDL_RUN_DIRS "
        "to folders with lightning_logs/version_*/metrics.csv"
    )
print(f"{len(runs)} runs read" + "".join(f"\nskipped {s}" for s in skipped))
for run in runs:  # folders under the project root are shown relative to it
    shown = run.path.relative_to(ROOT) if run.path.is_relative_to(ROOT) else run.path
    best = run.selected.get("val/epoch")
    print(f"  {shown}  {run.method()}  seed {run.seed}  best epoch {best:.0f}" if best is not None else shown)

# %% [markdown]
# ## Learning curves (one colour per group)

# %%
metrics = [m for m in METRICS.split(",") if any(r.curves.get(m) for r in runs)]
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
