"""A trained model used only for inference: frozen, always in eval mode, with its own normalisation.

Load one from a ``kdl`` checkpoint (:meth:`FrozenTeacher.from_checkpoint`) or from a registered net
name plus a ``state_dict`` file (:meth:`FrozenTeacher.from_weights`). Inputs are images in [0, 1];
the teacher applies the normalisation it was trained with, so a teacher and a student trained with
different statistics (or generated images) share a batch. ``requires_grad`` is off for every
parameter and :meth:`train` is a no-op, so ``LightningModule.train()`` called by the Trainer on the
parent module never puts the teacher's BatchNorm/Dropout into training mode.

With ``fold_bn`` on, inference runs on a copy of the net whose BatchNorms are folded into the
convolutions before them (:func:`kd_lightning.nets.fold.fold_bn`; ~1e-7 relative difference in the
outputs, measurably faster on CPU, see docs/performance.md). The copy is not a submodule: ``state_dict``,
checkpoints and ``.net`` keep the unfolded weights, and the copy is rebuilt whenever those weights, their
device or dtype change. With ``compile_inference`` also on, that copy is compiled with TorchInductor's freezing
(weights as constants, convolutions with their ReLU/residual add fused; see docs/performance.md): faster once
compiled, after seconds of compilation on the first call of each input shape.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.checkpoints import (
    CONFIG_KEY,
    NET_PREFIX,
    load_checkpoint,
    load_state_dict_file,
    net_state,
    state_mismatch,
)
from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.losses.simkd import ReusedTeacherHead, head_from_checkpoint
from kd_lightning.nets import FeatureExtractor, create_net, net_info, resolve_feature_path
from kd_lightning.nets.normalize import Normalize
from kd_lightning.nets.registry import Task


class FrozenTeacher(nn.Module):
    """A frozen net with its input normalisation.

    Args:
        net: the network (a registered net from :func:`kd_lightning.nets.create_net`).
        normalize: the normalisation it was trained with.
        task: ``"classification"`` or ``"regression"``.
        num_classes: classes of a classifier (``None`` for regression).
        net_name: registered name of ``net`` (for messages and checks).
        source: where it was loaded from (for messages).
        head: a replaced classifier head (SimKD students), applied to its feature.
        fold_bn: run inference on a BatchNorm-folded copy of ``net`` (see the module docstring).
        compile_inference: compile that folded copy with ``torch.compile`` (needs ``fold_bn``; on a CPU, a
            C++ compiler).
        image_size: the image side it was trained on (``None``: not known, e.g. a plain ``state_dict``).
    """

    def __init__(
        self,
        net: nn.Module,
        normalize: Normalize,
        task: Task,
        num_classes: int | None,
        net_name: str,
        source: str = "",
        head: ReusedTeacherHead | None = None,
        fold_bn: bool = False,
        compile_inference: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.net = net
        self.head = head
        self.normalize = normalize
        self.task = task
        self.num_classes = num_classes
        self.net_name = net_name
        self.source = source
        self.requires_grad_(False)
        super().train(False)
        self.channels_last = any(p.dim() == 4 for p in net.parameters())
        if self.channels_last:  # ~20% faster convolutions on CPU (see README, CPU notes)
            self.net.to(memory_format=torch.channels_last)
        self._extractor: FeatureExtractor | None = None
        self.fold_bn = fold_bn
        self.compile_inference = compile_inference
        # (key, folded net, folded conv paths); a tuple, so the copy is no submodule (not in state_dict)
        self._folded: tuple[tuple, nn.Module, frozenset[str]] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, fold_bn: bool = False) -> FrozenTeacher:
        """Load the net of a ``kdl`` checkpoint of a supervised (or distilled) model."""
        ckpt = load_checkpoint(path)
        hp = ckpt.get("hyper_parameters", {})
        name = hp.get("net")
        if not name:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds no 'net' hyper-parameter: it was not written by a "
                "kd_lightning model with a registered net (e.g. ImageClassifier)"
            )
        state = ckpt["state_dict"]
        task = _task_of(name, state)
        num_classes = hp.get("num_classes") if task == "classification" else None
        net = create_net(name, num_classes=num_classes or 1, in_channels=int(hp.get("in_channels", 3)), task=task)
        _load_strict(net, net_state(state), str(path))
        normalize = Normalize(hp.get("mean") or (0.5,), hp.get("std") or (0.5,), int(hp.get("in_channels", 3)))
        if "normalize.mean" in state:
            normalize.load_state_dict({"mean": state["normalize.mean"], "std": state["normalize.std"]})
        head = head_from_checkpoint(ckpt)  # a student that predicts through a replaced head (SimKD)
        # kdl links image_size from the data, so a kdl run's checkpoint (it holds the recipe) knows it; a model
        # built in Python may carry the constructor's default instead
        size = hp.get("image_size") if CONFIG_KEY in ckpt else None
        return cls(
            net,
            normalize,
            task,
            num_classes,
            name,
            source=str(path),
            head=head,
            fold_bn=fold_bn,
            image_size=int(size) if isinstance(size, int) else None,
        )

    @classmethod
    def from_weights(
        cls,
        net: str,
        weights: str | os.PathLike,
        num_classes: int | None = None,
        in_channels: int = 3,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        task: Task = "classification",
        fold_bn: bool = False,
    ) -> FrozenTeacher:
        """Build registered net ``net`` and load a ``state_dict`` file (or a kdl checkpoint's net weights)."""
        net_info(net)
        module = create_net(net, num_classes=num_classes or 1, in_channels=in_channels, task=task)
        _load_strict(module, load_state_dict_file(weights), str(weights))
        return cls(
            module,
            Normalize(mean, std, in_channels),
            task,
            num_classes if task == "classification" else None,
            net,
            source=str(weights),
            fold_bn=fold_bn,
        )

    # ------------------------------------------------------------------ behaviour
    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval: the Trainer toggling the parent module must not touch BatchNorm statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> logits (classification) or normalised predictions, N x 1 (regression)."""
        if self.head is not None:
            return self.forward_features(x, [])[0]
        return self.inference_net()(self._prepare(x))

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs and the named features (``stage{i}``, ``penultimate``, ``prepool`` or module paths)."""
        wanted = list(names)
        hooked = [*wanted, self.head.feature] if self.head is not None and self.head.feature not in wanted else wanted
        net = self.inference_net(hooked)
        if self._extractor is None or self._extractor.names != hooked or self._extractor.net is not net:
            if self._extractor is not None:
                self._extractor.close()
            self._extractor = FeatureExtractor(net, hooked)
        out, feats = self._extractor(self._prepare(x))
        if self.head is not None:
            out = self.head(feats[self.head.feature])
        return out, {k: feats[k] for k in wanted}

    def inference_net(self, features: Sequence[str] = ()) -> nn.Module:
        """The net inference runs on: the BN-folded copy when ``fold_bn`` is on, else :attr:`net`.

        A feature taken at a folded conv's path would differ (the folded conv includes its BN): then the
        unfolded net is used.
        """
        if not self.fold_bn:
            if self.compile_inference:
                raise ConfigError(f"compile_inference on {self.describe()} needs fold_bn: it compiles the folded copy")
            return self.net
        tensors = [*self.net.parameters(), *self.net.buffers()]
        key = (self.compile_inference, *((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors))
        if self._folded is None or self._folded[0] != key:
            from kd_lightning.nets.fold import fold_bn

            folded, pairs = fold_bn(self.net)
            if self.channels_last:
                folded.to(memory_format=torch.channels_last)
            if self.compile_inference:
                from kd_lightning.nets.compile import compile_frozen

                compile_frozen(folded, tensors[0].device if tensors else torch.device("cpu"))
            self._folded = (key, folded, frozenset(conv for conv, _ in pairs))
        _, folded, convs = self._folded
        if any(resolve_feature_path(self.net, f) in convs for f in features):
            return self.net
        return folded

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def describe(self) -> str:
        what = f"{self.num_classes} classes" if self.task == "classification" else "regression"
        return f"teacher {self.net_name} ({what}{', from ' + self.source if self.source else ''})"

    def check_compatible(
        self,
        task: str,
        num_classes: int | None,
        in_channels: int,
        who: str = "the data",
        image_size: int | None = None,
    ) -> None:
        """Fail, naming both sides, when this teacher does not fit ``who``'s task, classes, channels or image size.

        A teacher trained on another image size still runs (its nets pool globally) but answers poorly.
        """
        if task != self.task:
            raise ConfigError(f"{self.describe()} is a {self.task} model but {who} is a {task} task")
        if task == "classification" and num_classes is not None and num_classes != self.num_classes:
            raise ConfigError(
                f"{self.describe()} has num_classes={self.num_classes} but {who} has num_classes={num_classes}"
            )
        teacher_channels = self.normalize.mean.shape[1]
        if in_channels != teacher_channels:
            raise ConfigError(
                f"{self.describe()} takes in_channels={teacher_channels} but {who} has in_channels={in_channels}"
            )
        if image_size is not None and self.image_size is not None and image_size != self.image_size:
            raise ConfigError(
                f"{self.describe()} was trained on image_size={self.image_size} but {who} has image_size={image_size}; "
                "set data.init_args.image_size to the teacher's size"
            )


def _task_of(net: str, state: dict[str, torch.Tensor]) -> Task:
    """Regression when the net's head has a single output (a classifier has >= 2 classes), from the weights alone.

    This holds for every checkpoint with a registered net, whichever module wrote it (a supervised model, a
    distilled or self-distilled student).
    """
    head = state.get(f"{NET_PREFIX}{net_info(net).head}.weight")
    return "regression" if head is not None and head.shape[0] == 1 else "classification"


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    mismatch = state_mismatch(net.state_dict(), state, shown=3)
    if mismatch:
        name = getattr(getattr(net, "net_info", None), "name", type(net).__name__)
        raise CheckpointError(f"weights in {source!r} do not fit net {name!r} ({mismatch})")
    net.load_state_dict(state)
