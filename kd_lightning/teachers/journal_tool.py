"""``kdl journal``: check or repair a black-box query journal (see docs/mekd.md, "Journal").

    kdl journal check runs/x/queries/journal.bin     # read only: what is readable, where the damage is
    kdl journal repair runs/x/queries/journal.bin    # keep every readable record; the original is backed up

``check`` exits 0 when the journal is whole (or only its last record is torn, which a client cuts when it
opens the journal), 1 when it is corrupt, 2 when the file is not a journal or cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from kd_lightning.errors import KDLError


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``kdl journal check|repair PATH``."""
    parser = argparse.ArgumentParser(prog="kdl journal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True, metavar="{check,repair}")
    check = sub.add_parser("check", help="say what is readable and where a journal is damaged (writes nothing)")
    check.add_argument("path", help="the query journal (e.g. <run>/queries/journal.bin)")
    repair = sub.add_parser("repair", help="keep every readable record of a damaged journal (after a backup)")
    repair.add_argument("path", help="the query journal")
    repair.add_argument("--backup", default=None, help="where the original goes (default: PATH.corrupt-<UTC time>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kdl journal`` (returns the exit status)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and its message
        return int(e.code or 0)
    from kd_lightning.teachers.journal_repair import check_journal, repair_journal

    try:
        if args.action == "check":
            found = check_journal(args.path)
            print(found.describe())
            return 0 if found.ok else 1
        found, backup = repair_journal(args.path, args.backup)
        print(found.describe())
        if backup is None:
            print(f"{args.path}: nothing to repair; the file was not written")
        else:
            kept = found.records
            print(f"repaired {args.path}: kept its {kept} readable records; the original is in {backup}")
        return 0
    except KDLError as e:
        print(f"kdl journal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
