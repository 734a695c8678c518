"""Compile a LightningModule's nets with ``torch.compile`` (TorchInductor), in place, when a fit starts.

On the 2-core AVX-512 CPU of ``docs/performance.md``, kdl trains a compiled ResNet-20 1.10x faster than eager
in fp32 and 1.09x faster under ``bf16-mixed`` (``benchmarks/throughput.py --compile``), after 10-30 s of
compilation per graph: worth it for runs of several minutes, not for short ones (the demo's fits of 1-3
minutes got slower). Add it to a recipe or the command line::

    kdl fit --config recipes/fashion_mnist/teacher.yaml --trainer.callbacks+=kd_lightning.callbacks.Compile

Each module is compiled with :meth:`torch.nn.Module.compile`, which keeps the module object and its
``state_dict`` keys: checkpoints load with or without compilation, and feature hooks registered later see the
compiled net's features. Compiled kernels round differently from eager ones (about 1e-6 relative per step), so
a compiled run does not reproduce an eager run of the same seed bit for bit. Training mode, evaluation mode
and each new batch shape (an epoch's last, smaller batch) compile a graph of their own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from kd_lightning.errors import ConfigError

#: ``torch.compile`` modes (``None`` is the default mode)
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


class Compile(L.Callback):
    """Compile the named submodules of the LightningModule with ``torch.compile`` before the first step.

    Args:
        modules: module paths inside the LightningModule (``pl_module.get_submodule`` paths), e.g. ``net``
            (the trained net of every supervised or distillation method) and ``teacher.net`` (a frozen
            teacher's net). A path that does not exist is an error.
        mode: ``torch.compile``'s mode (``None``, ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``).
        dynamic: ``torch.compile``'s ``dynamic``; ``False`` (default) compiles one static graph per batch
            shape (the last, smaller batch of an epoch adds one), ``None`` lets PyTorch switch to a
            shape-generic graph after the first new shape.

    Methods with manual optimisation (the GANs, AI-KD, MEKD) are refused with a clear error: compiling the
    conditional GAN's nets fails in its alternating updates (an autograd error about a tensor modified in
    place), and the others were not checked. A loss that needs a second derivative (a gradient penalty with
    ``create_graph=True``) cannot go through a compiled module either: ``torch.compile`` has no double backward.
    """

    def __init__(
        self, modules: Sequence[str] = ("net",), mode: str | None = None, dynamic: bool | None = False
    ) -> None:
        if isinstance(modules, str):
            modules = [modules]
        if not modules:
            raise ConfigError("Compile(modules=[]) compiles nothing; name at least one module path, e.g. ['net']")
        if mode not in MODES:
            raise ConfigError(f"Compile(mode={mode!r}) is not a torch.compile mode; expected one of {list(MODES)}")
        self.modules = list(modules)
        self.mode = mode
        self.dynamic = dynamic
        self.compiled: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigError(
                f"Compile supports methods trained with automatic optimisation; {type(pl_module).__name__} "
                "optimises manually (GANs, AI-KD, MEKD), where compiled nets are not supported: drop the callback"
            )
        check_cpp_compiler(trainer.strategy.root_device, "Compile")
        for path in self.modules:
            module = _submodule(pl_module, path)
            if getattr(module, "_compiled_call_impl", None) is None:  # compiled once, even over fit + test
                module.compile(mode=self.mode, dynamic=self.dynamic)
            if path not in self.compiled:
                self.compiled.append(path)


def _submodule(pl_module: L.LightningModule, path: str) -> nn.Module:
    try:
        return pl_module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in pl_module.named_children()]
        raise ConfigError(
            f"Compile(modules=[{path!r}]): {type(pl_module).__name__} has no submodule {path!r}; "
            f"its top-level modules are {children}"
        ) from None
