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

from collections.abc import Sequence

import lightning as L
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.nets.compile import check_cpp_compiler

#: ``torch.compile`` modes (``None`` is the default mode)
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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

    Manually optimised methods compile too: ``Compile(modules=["generator", "discriminator"])`` for the GANs
    (their spectral norm updates its vectors outside the compiled graph, :mod:`kd_lightning.gans.spectral_norm`),
    ``["net"]`` for AI-KD's student. A module that a method lists in its ``compile_refused`` attribute is refused
    with the method's reason: AI-KD's critic, whose gradient penalty needs a second derivative
    (``create_graph=True``), which ``torch.compile`` does not support.
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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_cpp_compiler(trainer.strategy.root_device, "Compile")
        refused: dict[str, str] = getattr(pl_module, "compile_refused", {})
        for path in self.modules:
            if path in refused:
                raise ConfigError(
                    f"Compile(modules=[{path!r}]): {type(pl_module).__name__}'s {path!r} cannot be compiled: "
                    f"{refused[path]}; leave it out of modules"
                )
        for path in self.modules:
            module = _submodule(pl_module, path)
            if getattr(module, "_compiled_call_impl", None) is None:  # compiled once, even over fit + test
                module.compile(mode=self.mode, dynamic=self.dynamic)


def _submodule(pl_module: L.LightningModule, path: str) -> nn.Module:
    try:
        return pl_module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in pl_module.named_children()]
        raise ConfigError(
            f"Compile(modules=[{path!r}]): {type(pl_module).__name__} has no submodule {path!r}; "
            f"its top-level modules are {children}"
        ) from None
