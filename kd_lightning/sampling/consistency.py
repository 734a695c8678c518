"""A loud warning for a classification store whose labels are no better than chance.

A GAN that has not learnt its classes (the same image in every class) still passes cDR-RS and the
per-class filter (which always keeps the rho-quantile of each class), so a store can look normal
while its assigned labels carry nothing. The teacher's agreement with the assigned labels before
filtering (``label_consistency_before``) tells: at chance (1 / classes) the store is noise.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: a store whose label consistency is at most this multiple of chance gets the warning
CHANCE_FACTOR = 2.0


def chance_warning(report: dict[str, Any], num_classes: int, oracle: bool = False) -> str | None:
    """The warning for a store report, or ``None`` when its labels are clearly better than chance.

    ``oracle``: the store holds real images with their true labels (``kdl oracle``), so the teacher is to blame.
    """
    before = report.get("label_consistency_before")
    if before is None or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    if before > CHANCE_FACTOR * chance:
        return None
    after = report.get("label_consistency_after", float("nan"))
    cause = (
        "the teacher does not recognise real images with their true labels; train the teacher first"
        if oracle
        else "the GAN has not learnt its classes and its samples carry no label information; fix the GAN before "
        "using the store"
    )
    return (
        f"WARNING: the store's label consistency is {before:.1%} before filtering ({after:.1%} after), no better "
        f"than {CHANCE_FACTOR:g}x chance ({chance:.1%} for {num_classes} classes): {cause}"
    )


def store_chance_warning(path: str) -> str | None:
    """:func:`chance_warning` for the finished store folder ``path`` (``None`` for anything else)."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    settings = m.get("settings", {})
    if not m.get("finished") or settings.get("task") != "classification":
        return None
    return chance_warning(m.get("report", {}), len(settings.get("units", [])), oracle="oracle" in settings)


__all__ = ["CHANCE_FACTOR", "chance_warning", "store_chance_warning"]
