"""What kdl asks of the CPU it runs on: how many threads to use, and whether bf16 is fast on it."""

from __future__ import annotations

import os

import torch


def cpu_defaults() -> None:
    """Use every core the process may run on (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 on AMX tiles: Linux lists ``amx_bf16`` among its flags in ``/proc/cpuinfo``.

    The one check for "bf16 pays on this CPU" (``kdl fit`` warns without it; ``kd_lightning.demo --precision auto``
    picks bf16-mixed with it). Without AMX, bf16 autocast on the AVX-512 units was measured ~15x slower than fp32.
    The flag names the very instructions oneDNN runs bf16 convolutions and matmuls on (AMX-BF16, not only the
    tiles), and Linux lists it only once it has enabled the AMX register state, so it means usable, not only
    present; no private torch probe is needed. Where there is no ``/proc/cpuinfo`` (not Linux) the answer is
    False: fp32, the safe side.
    """
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False
