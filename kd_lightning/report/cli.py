"""``kdl report``: a table of runs (mean ± std over seeds) and their learning curves, from run folders alone.

The command's flags, ``--out`` (the markdown file, its folder and the curves' PNG beside it) and ``main``;
what it reads and shows lives in :mod:`.runs`, :mod:`.groups` and :mod:`.plots`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.fileio import atomic_write_bytes
from kd_lightning.report.groups import table
from kd_lightning.report.plots import plot_curves
from kd_lightning.report.runs import MONITORS, Run, expand_patterns, read_runs


def build_parser() -> ArgumentParser:
    """Build ``kdl report``'s argument parser (flags in :mod:`kd_lightning.flags`' convention)."""
    p = ArgumentParser(prog="kdl report", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("runs", nargs="+", type=str,
                   help="run folders (trainer.default_root_dir of each run) or quoted glob patterns "
                        "('runs/demo/*')")  # fmt: skip
    p.add_argument("--group_by", type=str, default="method",
                   help="method (same recipe but the seed), run (one row per run), parent, name (the run "
                        "folder's own name: seed<k>/<arm> layouts), none, "
                        "or a dotted config key (e.g. model.init_args.net)")  # fmt: skip
    p.add_argument("--metrics", type=str, default=None, help="comma-separated metrics (default: all val/ and test/)")
    p.add_argument("--out", type=str, default=None,
                   help="write the table (markdown) and its curves beside it; creates at most one folder")  # fmt: skip
    p.add_argument("--title", type=str, default="", help="a line above the table (budget, seeds, data ...)")
    p.add_argument("--quiet", type=bool, default=False, help="no progress output (a flag; also takes true/false)")
    p.add_argument("--all_versions", type=bool, default=False,
                   help="read every lightning_logs version of a run, not only its newest fit and the tests after "
                        "it (a flag; also takes true/false)")  # fmt: skip
    return p


#: old spellings still accepted
ALIASES = {"--group-by": "--group_by"}


def output_path(out: str) -> Path:
    """``--out``'s file; its folder is created only when that folder's parent exists (never a whole tree)."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out!r} is a folder; expected a markdown file name (e.g. {out}/report.md)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        if folder.exists():
            raise ConfigError(f"--out {out!r}: {str(folder)!r} is a file, not a folder")
        if not folder.parent.is_dir():
            raise ConfigError(f"--out {out!r}: folder {str(folder.parent)!r} does not exist; create it first "
                              "(kdl report creates only the last folder of --out)")  # fmt: skip
        try:
            folder.mkdir()
        except OSError as e:
            raise ConfigError(f"--out {out!r}: cannot create folder {str(folder)!r}: {e.strerror}") from None
    return path


def write_report(runs: list[Run], by: str, text: str, out: str) -> str:
    """Write ``text`` and the curves of the first monitor to ``out``; return the text with the figure linked."""
    path = output_path(out)
    try:
        for m in [m for m, _ in MONITORS if any(r.curves.get(m) for r in runs)][:1]:
            png = path.with_name(f"{path.stem}_{m.replace('/', '_')}.png")
            if plot_curves(runs, by, m, png):
                text += f"\n\n![{m} per epoch]({png.name})"
        atomic_write_bytes(path, (text + "\n").encode())
    except OSError as e:
        raise ConfigError(f"--out {out!r}: cannot write there: {e.strerror or e}") from None
    return text


def main(argv: list[str] | None = None) -> int:
    """Run ``kdl report``; return the exit status."""
    from kd_lightning.flags import normalize

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(normalize(argv, bools=["--quiet", "--all_versions"], aliases=ALIASES))
    except Exception as e:  # noqa: BLE001 - jsonargparse reports usage errors as exceptions here
        print(f"kdl report: error: {e}", file=sys.stderr)
        return 2
    try:
        runs, skipped = read_runs(expand_patterns(args.runs), quiet=args.quiet, all_versions=args.all_versions)
        for note in (n for r in runs for n in r.notes):
            print(f"kdl report: warning: {note}", file=sys.stderr)
        if skipped:
            shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
            print(
                f"kdl report: skipped {len(skipped)} path(s) that are not runs (no lightning_logs): {shown}",
                file=sys.stderr,
            )
        metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
        text = table(runs, args.group_by, metrics)
        if args.title:
            text = f"{args.title}\n\n{text}"
        if args.out:
            text = write_report(runs, args.group_by, text, args.out)
        print(text)
    except KDLError as e:
        print(f"kdl report: error: {e}", file=sys.stderr)
        return 2
    return 0
