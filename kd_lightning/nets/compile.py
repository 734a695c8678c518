"""TorchInductor compilation for frozen nets, and the C++-compiler check every CPU compilation needs.

Used by :class:`~kd_lightning.teachers.FrozenTeacher` (``compile_inference``), ``kdl generate --compile`` and the
:class:`~kd_lightning.callbacks.Compile` callback (training).
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from kd_lightning.errors import ConfigError


def cpp_compiler() -> str | None:
    """The C++ compiler TorchInductor builds CPU kernels with (``$CXX``, else ``g++``), if it is on ``PATH``."""
    return shutil.which(os.environ.get("CXX", "g++"))


def check_cpp_compiler(device: torch.device, who: str) -> None:
    """Fail with a clear message when compiling on ``device`` (a CPU) would need a C++ compiler that is missing."""
    if device.type == "cpu" and cpp_compiler() is None:
        raise ConfigError(
            f"{who} needs a C++ compiler for CPU kernels: {os.environ.get('CXX', 'g++')!r} is not on PATH; "
            "install one (apt-get install g++, or set CXX) or turn compilation off"
        )


def compile_frozen(net: nn.Module, device: torch.device) -> nn.Module:
    """Compile a frozen eval-mode ``net`` in place for inference: TorchInductor with freezing.

    Freezing treats the weights as constants, folds what it can and lets oneDNN fuse each convolution with the
    ReLU or residual add after it. Only for a net whose weights never change afterwards (a private copy:
    FrozenTeacher's folded net, the generator copy of ``kdl generate``); call it under ``no_grad`` or
    ``inference_mode``. Shapes are static until a second one appears, then generic (``dynamic=None``).
    """
    check_cpp_compiler(device, "compiling a frozen net")
    net.compile(options={"freezing": True})
    return net
