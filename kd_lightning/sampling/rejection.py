"""Rejection sampling with density ratios (cDR-RS, Ding et al. 2022), in deterministic chunks.

A proposal x ~ p_g(x|y) is accepted with probability r(x|y) / M, where r = p_r/p_g is the estimated
density ratio and M its largest value, estimated from a burn-in sample; accepted samples follow
p_g * r / M, i.e. p_r where the ratio is right. The official code also raises M to the largest ratio
of every later batch before deciding on it (``update_max=True``); with a fixed M (``False``, the
textbook algorithm) a ratio above M is accepted with probability 1.

Proposals come in chunks whose random numbers depend only on ``(seed, unit, chunk index)`` (see
:func:`chunk_generator`), so a run stopped after any chunk and resumed gives the same samples.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from kd_lightning.errors import KDLError


class AcceptanceError(KDLError):
    """Too many proposals for too few acceptances (the ratio model rejects almost everything)."""


def chunk_generator(seed: int, unit: str, chunk: int | str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, unit, chunk)`` alone (stable across processes and runs)."""
    digest = hashlib.sha256(f"{seed}/{unit}/{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def estimate_max(ratios: torch.Tensor) -> float:
    """M of cDR-RS: the largest density ratio of the burn-in sample (must be positive)."""
    if ratios.numel() == 0:
        raise AcceptanceError("the burn-in sample is empty; expected burn_in >= 1")
    m = float(ratios.max())
    if not m > 0:
        raise AcceptanceError(
            f"every burn-in density ratio is {m:.3g}: the density-ratio model assigns no mass to the generator's "
            "samples; check the DR checkpoint"
        )
    return m


def accept(
    ratios: torch.Tensor, uniforms: torch.Tensor, max_ratio: float, update_max: bool = False
) -> tuple[torch.Tensor, float]:
    """Accept ``u <= r / M`` for each proposal; returns the mask and M after this chunk.

    With ``update_max`` M first becomes ``max(M, max r)`` of the chunk (the official code's order).
    """
    m = max(max_ratio, float(ratios.max())) if update_max and ratios.numel() else max_ratio
    return uniforms <= ratios.double() / m, m


def check_trials(unit_name: str, proposed: int, accepted: int, needed: int, max_proposals: int) -> None:
    """Raise, naming the unit and its acceptance rate, once ``proposed`` exceeds the bound."""
    if proposed >= max_proposals and accepted < needed:
        rate = accepted / max(proposed, 1)
        raise AcceptanceError(
            f"{unit_name}: accepted {accepted} of {proposed} proposals (acceptance rate {rate:.2%}) but {needed} "
            f"are needed; max_proposals={max_proposals} reached. The density ratios are near zero for this "
            "condition: retrain the DR model, lower the count, raise max_proposals, or turn subsampling off"
        )


def acceptance_report(progress: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """M1's part of the report: accepted, proposed, acceptance rate and M of every unit, and the overall rate."""
    units = {
        name: {
            "accepted": st["accepted"],
            "proposed": st["proposed"],
            "acceptance_rate": st["accepted"] / max(st["proposed"], 1),
            "max_ratio": st["max_ratio"],
        }
        for name, st in progress.items()
    }
    total_acc = sum(u["accepted"] for u in units.values())
    total_prop = sum(u["proposed"] for u in units.values())
    return {"units": units, "acceptance_rate": total_acc / max(total_prop, 1)}


__all__ = ["AcceptanceError", "accept", "acceptance_report", "check_trials", "chunk_generator", "estimate_max"]
