"""CRD: contrastive representation distillation with memory banks over sample indices."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import KDLoss, Outputs, SetupInfo, StepContext, require_shape
from kd_lightning.per_sample import PerSampleStore


class Embed(nn.Module):
    """Linear projection followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


def nce_loss(scores: torch.Tensor, num_indices: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss on ``B x (K+1)`` scores whose first column is the positive pair.

    With noise distribution ``P_n = 1 / N`` and ``K`` noise samples, the posterior of "real pair" is
    ``P / (P + K P_n)``: ``-[log h(positive) + sum_k log(1 - h(negative_k))]``, averaged over the batch.
    """
    k = scores.shape[1] - 1
    noise = k / num_indices
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


class CRD(KDLoss):
    """Tian et al., "Contrastive Representation Distillation" (ICLR 2020).

    Student and teacher penultimate features are embedded (linear + L2 norm, 128-d) and contrasted
    against memory banks that hold one embedding per training sample (keyed by ``batch["index"]``):
    the student's embedding against ``K`` random teacher-bank entries plus its own sample's, and
    symmetrically. Scores ``exp(v . m / tau) / Z`` (``Z`` fixed from the first batch as the
    estimate of the partition function) feed the NCE loss; banks are updated with momentum 0.5.
    Paper defaults: 128-d, ``K = 16384`` (capped at the number of samples - 1), ``tau = 0.07``,
    weight 0.8. RepDistiller's and cGAN-KD's CRD runs (``--distill crd -a 1 -b 0.8``) stack it with BLKD
    weight 1 (T 4) and CE weight 1: ``task_weight: 1`` plus ``BLKD(weight=1.0)`` and ``CRD(weight=0.8)``.

    Negatives (``negatives``): ``uniform`` draws the K indices uniformly, with replacement, from the whole
    index range (the paper's noise distribution; it can draw the positive itself and same-class samples);
    ``exact`` is RepDistiller's default mode: K training samples of OTHER classes, without replacement
    (with replacement only when a class has fewer than K negatives); it needs the training labels, which
    :class:`~kd_lightning.methods.DistillModule` passes in through :meth:`setup_labels`.

    The banks are the fields ``memory_s``/``memory_t`` of a :class:`~kd_lightning.per_sample.PerSampleStore` sized
    by the training index range, saved in checkpoints as this module's extra state (so resume is exact). Under DDP
    each process keeps its own banks, updated with its own samples.

    Args:
        feat_dim: embedding size.
        nce_k: number of negatives per sample.
        nce_t: temperature.
        momentum: momentum of the bank update.
        negatives: ``uniform`` (the paper) or ``exact`` (RepDistiller: other classes, without replacement).
        student_feature / teacher_feature: features to embed (default the penultimate vectors).
        weight: factor in the total loss.
    """

    uses_indices = True
    z_s: torch.Tensor
    z_t: torch.Tensor
    embed_s: Embed
    embed_t: Embed

    def __init__(
        self,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        negatives: Literal["uniform", "exact"] = "uniform",
        student_feature: str = "penultimate",
        teacher_feature: str = "penultimate",
        weight: float = 0.8,
    ) -> None:
        super().__init__(weight)
        if negatives not in ("uniform", "exact"):
            raise ConfigError(f"CRD: negatives={negatives!r}; expected 'uniform' or 'exact'")
        self.negatives = negatives
        self.uses_labels = negatives == "exact"
        self.labels: torch.Tensor | None = None  # class of every index (-1: not a training sample), for "exact"
        if nce_k < 1 or feat_dim < 1 or nce_t <= 0 or not 0 <= momentum < 1:
            raise ConfigError(
                f"CRD: feat_dim={feat_dim}, nce_k={nce_k}, nce_t={nce_t}, momentum={momentum}; expected "
                "positive sizes and temperature and a momentum in [0, 1)"
            )
        self.feat_dim, self.nce_k, self.nce_t, self.momentum = feat_dim, nce_k, nce_t, momentum
        self.student_features, self.teacher_features = (student_feature,), (teacher_feature,)
        self.banks = PerSampleStore(name="CRD's memory banks")
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def setup(self, info: SetupInfo) -> None:
        s_dim = math.prod(require_shape(self, "student", info.student_shapes, self.student_features[0], 1))
        t_dim = math.prod(require_shape(self, "teacher", info.teacher_shapes, self.teacher_features[0], 1))
        self.embed_s, self.embed_t = Embed(s_dim, self.feat_dim), Embed(t_dim, self.feat_dim)

    def setup_data(self, num_indices: int) -> None:
        if num_indices < 2:
            raise ConfigError(f"CRD needs at least 2 training samples, got an index range of {num_indices}")
        if self.banks.size == num_indices and "memory_s" in self.banks.fields:
            return
        device = self.z_s.device
        std = 1.0 / math.sqrt(self.feat_dim / 3)
        self.banks.resize(num_indices)
        self.banks.to(device)
        self.banks.set_field("memory_s", (torch.rand(num_indices, self.feat_dim, device=device) * 2 - 1) * std)
        self.banks.set_field("memory_t", (torch.rand(num_indices, self.feat_dim, device=device) * 2 - 1) * std)
        self.z_s.fill_(-1.0)
        self.z_t.fill_(-1.0)

    def setup_labels(self, labels: torch.Tensor) -> None:
        """The class of every index of the training range (-1 for indices that are not training samples)."""
        self.labels = labels.long().flatten()

    def draw_contrast(self, idx: torch.Tensor, label: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
        """``B x (K+1)`` bank indices: column 0 the positive (the sample itself), then K negatives."""
        if self.negatives == "uniform":
            contrast = torch.randint(0, n, (len(idx), k + 1), device=idx.device)
        else:
            if self.labels is None or len(self.labels) != n:
                raise ConfigError(
                    "CRD negatives='exact' needs the training labels of every index: setup_labels(labels) was not "
                    f"called for this index range ({n}); DistillModule does it when fit starts with a DataModule"
                )
            labels = self.labels.to(idx.device)
            if label is None:
                label = labels[idx]
            eligible = (labels.unsqueeze(0) >= 0) & (labels.unsqueeze(0) != label.view(-1, 1))  # B x n
            fewest = int(eligible.sum(1).min())
            if fewest == 0:
                raise ConfigError("CRD negatives='exact': a batch sample has no training sample of another class")
            if k <= fewest:  # a uniform random K-subset of each row's negatives: the K smallest random keys
                keys = torch.rand(eligible.shape, device=idx.device).masked_fill(~eligible, 2.0)
                negatives = keys.topk(k, dim=1, largest=False).indices
            else:
                negatives = torch.multinomial(eligible.float(), k, replacement=True)
            contrast = torch.cat([idx.view(-1, 1), negatives], dim=1)
        contrast[:, 0] = idx
        return contrast

    @property
    def memory_s(self) -> torch.Tensor:
        """The student-embedding bank (``num_indices x feat_dim``; empty before :meth:`setup_data`)."""
        return self.banks.fields.get("memory_s", torch.empty(0, self.feat_dim))

    @property
    def memory_t(self) -> torch.Tensor:
        """The teacher-embedding bank."""
        return self.banks.fields.get("memory_t", torch.empty(0, self.feat_dim))

    def get_extra_state(self) -> dict[str, Any]:
        return self.banks.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.banks.load_state_dict(state)
        self.banks.to(self.z_s.device)

    def resize_for_state(self, state: dict[str, Any], prefix: str) -> None:
        """Checkpoints before the banks moved into a PerSampleStore held them as buffers: convert them."""
        if prefix + "memory_s" in state and prefix + "_extra_state" not in state:
            mem_s, mem_t = state.pop(prefix + "memory_s"), state.pop(prefix + "memory_t")
            state[prefix + "_extra_state"] = {
                "fields": {"memory_s": mem_s, "memory_t": mem_t},
                "seen": torch.ones(len(mem_s), dtype=torch.bool),
            }

    def forward(
        self, student: Outputs, teacher: Outputs, batch: dict[str, Any], ctx: StepContext | None = None
    ) -> torch.Tensor:
        n = self.banks.size
        if n == 0 or "memory_s" not in self.banks.fields:
            raise ConfigError(
                "CRD's memory banks are empty: setup_data(num_indices) was not called "
                "(DistillModule does it when fit starts with a DataModule; without one, call it yourself)"
            )
        idx = batch["index"].long()
        if self.banks.device != idx.device:  # the store is no buffer: it follows the batches to their device
            self.banks.to(idx.device)
        v_s = self.embed_s(student.features[self.student_features[0]])
        v_t = self.embed_t(teacher.features[self.teacher_features[0]])
        k = min(self.nce_k, n - 1)
        label = batch.get("label")
        contrast = self.draw_contrast(idx, None if label is None else label.long(), n, k)
        # student embedding against teacher-bank entries, and the reverse
        w_t = self.memory_t[contrast].detach()
        w_s = self.memory_s[contrast].detach()
        out_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.nce_t)
        out_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.nce_t)
        if self.z_s < 0:  # partition-function estimates, fixed at the first batch
            self.z_s.fill_(float(out_s.mean().detach()) * n)
            self.z_t.fill_(float(out_t.mean().detach()) * n)
        loss = nce_loss(out_s / self.z_s, n) + nce_loss(out_t / self.z_t, n)
        if ctx is None or ctx.training:
            with torch.no_grad():
                for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    bank[idx] = F.normalize(bank[idx] * self.momentum + v.detach() * (1 - self.momentum), dim=1)
        return loss
