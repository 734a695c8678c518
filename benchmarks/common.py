"""What the benchmark scripts share: quiet-trainer arguments, the report writer, FLOP counting and timing.

``benchmarks`` is a package: run a script from the repository root as a module, e.g.
``python -m benchmarks.throughput --help``.

Timing: a call that can be repeated on its own (a forward pass, a sampling pass, a matmul) is timed with
``torch.utils.benchmark.Timer`` (:func:`seconds_per_call`), which synchronises CUDA, picks the number of calls per
measurement and reports the spread; training steps inside a Lightning run are timed from the start of one step
to the start of the next (:class:`StepTimer`, :func:`steady_rate`). Timings vary with the machine's load: never
assert them in tests.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from kd_lightning.cli import quiet_lightning

__all__ = [
    "NO_CHECKPOINTS",
    "NO_LOGGER",
    "QUIET",
    "REPO",
    "StepTimer",
    "count_flops",
    "fp32_peak_flops",
    "quiet_lightning",
    "report",
    "seconds_per_call",
    "steady_rate",
    "sync",
]

#: the repository root (recipes are found from it)
REPO = Path(__file__).resolve().parents[1]
#: no progress bar and no model summary: a benchmark prints its own lines
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
#: ``QUIET`` and no logger (timing runs that keep nothing)
NO_LOGGER = ["--trainer.logger", "false", *QUIET]
#: no checkpoint written (timing runs)
NO_CHECKPOINTS = ["--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]


def report(text: str, out: Path | None, heading: str) -> str:
    """Print ``text`` and, when ``out`` is given, write it there under a ``# heading`` (folders made)."""
    print("\n" + text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {heading}\n\n{text}\n")
    return text


# ------------------------------------------------------------------------------------------------ FLOPs
def count_flops(fn: Callable[[], object]) -> int:
    """Model FLOPs of one call of ``fn`` (``torch.utils.flop_counter``; set grad mode and eval/train mode
    inside ``fn`` as the measured work needs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------- timing
def seconds_per_call(fn: Callable[[], object], min_seconds: float = 0.5, best: bool = False) -> float:
    """Seconds per call of ``fn``: ``torch.utils.benchmark.Timer`` over at least ``min_seconds``, after one
    untimed warm-up call (oneDNN and cuDNN build their kernels on the first call); the median of its
    measurements, or the fastest one with ``best``."""
    fn()
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_seconds)
    return min(measurement.times) if best else measurement.median


def fp32_peak_flops(n: int = 2048, seconds: float = 1.0) -> float:
    """The machine's fp32 matmul FLOP/s: the fastest timed ``n x n @ n x n`` on the CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / seconds_per_call(lambda: torch.mm(a, b), min_seconds=seconds, best=True)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a step's start time is when the previous step really ended."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Start time of every training step, by epoch (for :func:`steady_rate`)."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, float]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        sync(pl_module.device)
        self.starts.append((trainer.current_epoch, time.perf_counter()))


def steady_rate(starts: list[tuple[int, float]], batch: int, warmup: int) -> float:
    """Images/s from step start times: intervals between consecutive steps of an epoch, after warmup."""
    intervals = [t1 - t0 for (e0, t0), (e1, t1) in itertools.pairwise(starts) if e0 == e1][warmup:]
    return batch * len(intervals) / sum(intervals)
