"""White-box distillation: a student, a frozen teacher, and a weighted list of KD losses.

``loss = task_weight * task + sum_i weight_i * kd_i``, where ``task`` is cross-entropy
(classification) or MSE/L1 on labels normalised to [0, 1] (regression) and each ``kd_i`` is a
registered :class:`~kd_lightning.losses.KDLoss`. The task (classification or regression) is the
teacher's. ``training_step`` logs every part: ``train/loss``, ``train/task``, ``train/kd/<name>``
(and ``train/kd/<name>/<part>`` for losses with several parts).

The teacher's outputs on the training data can be cached by sample index (``cache_teacher``)
when the training images are the same every epoch (no augmentation): the teacher then runs once
per sample instead of once per sample per epoch. With an :class:`~kd_lightning.data.AugmentedDataModule`
whose store was filtered by the same teacher file, the stored teacher logits fill the cache for the
fake samples and the teacher never runs on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Protocol, cast, runtime_checkable

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import nn
from torch.utils.data import Dataset, Subset

from kd_lightning.data.utils import augments, num_indices  # num_indices: re-exported (its old home)
from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext
from kd_lightning.losses.simkd import ReusedTeacherHead
from kd_lightning.methods.supervised import NetTask
from kd_lightning.methods.tasks import TaskSpec, task_spec
from kd_lightning.nets import FeatureExtractor, NetInfo
from kd_lightning.nets.features import PENULTIMATE, PREPOOL, stage_name
from kd_lightning.per_sample import PerSampleStore
from kd_lightning.teachers import FrozenTeacher


@runtime_checkable
class StoresTeacherOutputs(Protocol):
    """A DataModule whose sample store may hold the outputs of the teacher that filtered it (AugmentedDataModule)."""

    def stored_teacher_outputs(
        self, teacher_sha256: str, image_size: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None: ...


class DistillModule(NetTask):
    """Train the student ``net`` with a task loss and KD losses from a frozen teacher.

    Args:
        teacher: path of the teacher: a ``kdl`` checkpoint (e.g. ``runs/.../best.ckpt``), or a
            ``state_dict`` file when ``teacher_net`` is given.
        kd_losses: the KD terms, each with its own ``weight`` (e.g. ``[{class_path: BLKD,
            init_args: {T: 4, weight: 0.9}}]``); empty = the NOKD baseline with a teacher attached.
        task_weight: weight of the task loss (CE or regression loss).
        teacher_net: registered net name when ``teacher`` is a plain ``state_dict`` file (it is then
            assumed to use this model's normalisation and task).
        cache_teacher: keep the teacher's training-set outputs by sample index and reuse them every
            epoch; requires un-augmented training data (``data.init_args.augment: false``).
        label_smoothing: cross-entropy label smoothing (classification).
        regression_loss: ``"mse"`` or ``"l1"`` (regression).
        **kwargs: see :class:`~kd_lightning.methods.supervised.NetTask` (``net`` is the student).
    """

    def __init__(
        self,
        teacher: str,
        kd_losses: list[KDLoss] | None = None,
        task_weight: float = 1.0,
        teacher_net: str | None = None,
        cache_teacher: bool = False,
        label_smoothing: float = 0.0,
        regression_loss: Literal["mse", "l1"] = "mse",
        **kwargs: Any,
    ) -> None:
        if task_weight < 0:
            raise ConfigError(f"task_weight={task_weight}; expected a value >= 0")
        if regression_loss not in ("mse", "l1"):
            raise ConfigError(f"regression_loss={regression_loss!r}; expected 'mse' or 'l1'")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing}; expected a value in [0, 1)")
        losses = list(kd_losses or [])
        for term in losses:
            if not isinstance(term, KDLoss):
                raise ConfigError(f"kd_losses: {term!r} is not a KDLoss (see kd_lightning.losses.list_losses())")
            if not term.for_distill:
                raise ConfigError(
                    f"kd_losses: {type(term).__name__} is a self-distillation term; it goes in SelfKD's `terms`, "
                    "not in DistillModule's kd_losses (see kd_lightning.losses.list_losses())"
                )
        self._pending_losses = losses  # registered by configure_models (nn.Module is not set up yet)
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ construction
    def _load_teacher(self) -> FrozenTeacher:
        hp = self.hparams
        if hp.teacher_net is None:
            return FrozenTeacher.from_checkpoint(hp.teacher)
        return FrozenTeacher.from_weights(
            hp.teacher_net,
            hp.teacher,
            num_classes=hp.num_classes,
            in_channels=hp.in_channels,
            mean=hp.mean or (0.5,),
            std=hp.std or (0.5,),
            task="regression" if hp.label_range is not None else "classification",
        )

    def make_task_spec(self) -> TaskSpec:
        return task_spec(self.task, self.hparams.label_smoothing, self.hparams.regression_loss)

    def configure_models(self) -> None:
        teacher = self._load_teacher()
        self.task = teacher.task  # the student learns the teacher's task
        super().configure_models()
        losses, self._pending_losses = self._pending_losses, []
        hp = self.hparams
        for term in losses:
            if term.uses_logits and not self.spec.has_classes:
                raise ConfigError(
                    f"{type(term).__name__} compares class outputs and cannot distil a {self.task} "
                    f"{teacher.describe()}; use feature or relation losses (FitNet, AT, RKD, ...)"
                )
        teacher.check_compatible(
            self.task,
            hp.num_classes if self.spec.has_classes else None,
            hp.in_channels,
            who=f"the student {hp.net!r}",
            image_size=hp.get("image_size"),
        )
        self.teacher = teacher
        info = SetupInfo(
            self._probe(self.net, self.normalize, hp),
            self._probe(teacher.net, teacher.normalize, hp),
            hp.num_classes,
            self.task,
            teacher_net=teacher.net,
        )
        for term in losses:
            term.setup(info)
        heads = [t for t in losses if getattr(t, "replaces_head", False)]
        if len(heads) > 1:
            raise ConfigError(
                f"kd_losses: {', '.join(type(t).__name__ for t in heads)} each replace the student's head; keep one"
            )
        if heads:  # the only loss that replaces the head is SimKD, whose head is a ReusedTeacherHead
            self.attach_head(cast(ReusedTeacherHead, heads[0].head))
        self.kd_terms = nn.ModuleList(losses)
        self.kd_names = _unique_names([t.name for t in losses])
        self.student_feature_names = sorted({n for t in losses for n in t.student_features})
        self.teacher_feature_names = sorted({n for t in losses for n in t.teacher_features})
        self._student_features = FeatureExtractor(self.net, self.student_feature_names)
        # the teacher's outputs by sample index; rows are given out on first sight of an index (sparse)
        self.teacher_cache = PerSampleStore(sparse=True, name="the teacher cache")

    @staticmethod
    @torch.no_grad()
    def _probe(net: nn.Module, normalize: nn.Module, hp: AttributeDict) -> dict[str, torch.Size]:
        """Shapes (without the batch axis) of every declared stage and the penultimate feature."""
        info = cast(NetInfo, net.net_info)  # create_net sets it on every registered net
        names = [stage_name(i) for i in range(len(info.stages))] + [PENULTIMATE, PREPOOL]
        was_training = net.training
        net.eval()
        x = normalize(torch.zeros(2, hp.in_channels, hp.image_size, hp.image_size))
        with FeatureExtractor(net, names) as fx:
            _, feats = fx(x)
        net.train(was_training)
        return {k: v.shape[1:] for k, v in feats.items()}

    # ------------------------------------------------------------------ data checks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or stage != "fit":
            return
        if self.hparams.cache_teacher and augments(dm):
            raise ConfigError(
                f"cache_teacher=true reuses the teacher's outputs for each sample, but {type(dm).__name__} "
                "augments its training images (augment=true); set data.init_args.augment false or "
                "cache_teacher false"
            )
        if any(t.uses_indices for t in self.iter_kd_terms()) or self.hparams.cache_teacher:
            n = num_indices(dm)
            for term in self.iter_kd_terms():
                if term.uses_indices:
                    term.setup_data(n)
                if term.uses_labels:
                    term.setup_labels(train_labels_by_index(dm, n))
            # at most len(train_dataset) rows are needed, whatever the index range
            self.teacher_cache.resize(n, capacity=len(dm.train_dataset))
            if self.hparams.cache_teacher and isinstance(dm, StoresTeacherOutputs):
                self._prefill_teacher_cache(dm)

    def iter_kd_terms(self) -> Iterable[KDLoss]:
        """The KD terms, in order (``kd_terms`` is an ``nn.ModuleList``, which types its items as plain Modules)."""
        return cast("Iterable[KDLoss]", self.kd_terms)

    def _prefill_teacher_cache(self, dm: StoresTeacherOutputs) -> None:
        """Take the teacher logits a sample store already holds (same teacher file, same image size).

        Only when no KD loss needs teacher features: the store keeps the teacher's outputs, not its features.
        """
        import os

        from kd_lightning.sampling.store import sha256_file

        self.prefilled = 0
        if self.teacher_feature_names or not os.path.isfile(str(self.hparams.teacher)):
            return
        stored = dm.stored_teacher_outputs(sha256_file(self.hparams.teacher), int(self.hparams.image_size))
        if stored is None:
            return
        index, logits = stored
        self.teacher_cache.write(index, logits=logits.to(self.device))
        self.prefilled = len(index)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for i, term in enumerate(self.iter_kd_terms()):
            term.resize_for_state(state, f"kd_terms.{i}.")
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ forward passes
    def student_outputs(self, x: torch.Tensor) -> Outputs:
        """The student's raw outputs (N x C, or N x 1 for regression) and its requested features."""
        logits = self.raw_forward(x)
        return Outputs(logits, dict(self._student_features.features))

    def teacher_outputs(self, x: torch.Tensor) -> Outputs:
        logits, feats = self.teacher.forward_features(x, self.teacher_feature_names)
        return Outputs(logits, feats)

    def teacher_outputs_for(self, batch: dict[str, torch.Tensor]) -> Outputs:
        """Teacher outputs for a training batch, from the cache when ``cache_teacher`` is on."""
        cache = self.teacher_cache
        if not self.hparams.cache_teacher or cache.size == 0:
            return self.teacher_outputs(batch["image"])
        idx = batch["index"]
        new = ~cache.contains(idx).cpu()
        if bool(new.any()):  # run the teacher on the samples not seen yet (eval mode: per-sample outputs)
            out = self.teacher_outputs(batch["image"][new.to(batch["image"].device)])
            cache.write(idx.cpu()[new], logits=out.logits, **out.features)
        cached = {k: cache.read(idx, k) for k in cache.fields}
        return Outputs(cached.pop("logits"), cached)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        student = self.student_outputs(batch["image"])
        teacher = self.teacher_outputs_for(batch)
        pred = self.spec.prediction(student.logits)
        task = self.spec.loss(self.criterion, pred, batch["label"])
        parts: dict[str, torch.Tensor] = {"task": task.detach()}
        total = self.hparams.task_weight * task
        ctx = StepContext(self.student_outputs, self.teacher_outputs, epoch=self.current_epoch, training=True)
        for name, term in zip(self.kd_names, self.iter_kd_terms()):
            value = term(student, teacher, batch, ctx)
            if isinstance(value, dict):
                for k, v in value.items():
                    parts[f"kd/{name}/{k}"] = v.detach()
                value = sum(value.values())
            parts[f"kd/{name}"] = value.detach()
            total = total + term.weight * value
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=True, on_epoch=True)
        self.update_metrics("train", pred, batch["label"])
        return total


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}{seen[n]}")
    return out


def train_labels_by_index(dm: L.LightningDataModule, n: int) -> torch.Tensor:
    """The class of every index of the training range; -1 for indices that are not training samples.

    An index (``batch["index"]``) is the position in the un-split dataset; the validation split's are -1.
    """
    ds: Dataset | None = getattr(dm, "train_dataset", None)
    if ds is None:
        raise ConfigError(f"{type(dm).__name__} has no train_dataset after setup; cannot read its labels")
    from kd_lightning.data.utils import dataset_labels, dataset_len

    labels = dataset_labels(ds)
    positions = torch.arange(dataset_len(ds))
    while isinstance(ds, Subset):
        positions = torch.as_tensor(ds.indices, dtype=torch.long)[positions]
        ds = ds.dataset
    out = torch.full((n,), -1, dtype=torch.long)
    out[positions] = labels.long()
    return out


__all__ = ["DistillModule", "num_indices", "train_labels_by_index"]
