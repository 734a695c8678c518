"""``kdl report``: a table of runs (mean ± std over seeds) and their learning curves, from run folders alone.

    kdl report runs/evidence/distill/*/seed* --group-by parent --out docs/distill_report.md
    kdl report runs/sweeps/blkd_digits/sweep-*/* --group-by run        # one row per run

Nothing is trained and nothing is read from the network: it works offline on any copy of the run folders.
Grouping never averages runs of different recipes: the default (``method``) puts runs together only when their
model and data sections are the same except for the seed, and names a group by its method and net plus the keys
that tell it from its namesakes. A folder given that holds no Lightning logs at all (a sample store beside the
runs, a notes folder) is skipped and counted; a run whose files cannot be read is an error naming the file.

One module per job: :mod:`.runs` reads run folders (what a run folder is, and which epoch counts),
:mod:`.groups` groups runs and builds the table and the curves' data, :mod:`.plots` draws the curves
(matplotlib, imported only there), :mod:`.cli` is the command (its flags and ``--out``). Every name below is
importable from ``kd_lightning.report``, as it was when the package was one module.
"""

from kd_lightning.report.cli import ALIASES, build_parser, main, output_path, write_report
from kd_lightning.report.groups import (
    PERCENT_KEYS,
    group_curves,
    group_key,
    group_runs,
    mean_std,
    recipe_identity,
    table,
)
from kd_lightning.report.plots import draw_curves, plot_curves
from kd_lightning.report.runs import MONITORS, Run, is_run_folder, method_name, read_run, read_runs

__all__ = [
    "ALIASES",
    "MONITORS",
    "PERCENT_KEYS",
    "Run",
    "build_parser",
    "draw_curves",
    "group_curves",
    "group_key",
    "group_runs",
    "is_run_folder",
    "main",
    "mean_std",
    "method_name",
    "output_path",
    "plot_curves",
    "read_run",
    "read_runs",
    "recipe_identity",
    "table",
    "write_report",
]
