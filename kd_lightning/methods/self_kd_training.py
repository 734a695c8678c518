"""How :class:`~kd_lightning.methods.self_kd.SelfKD` trains: its loss, one training step, the critic's updates.

:class:`SelfKDTraining` holds the step half of ``SelfKD`` (``methods/self_kd.py`` holds what it is: its arguments,
their checks, and the terms, critic and S_sup it builds): the weighted loss parts, the manual optimisation of the
student and the critic, the critic's W monitor, the update of the per-sample store and the store's old checkpoint
key.

p_{t-1}: a per-sample store of the logits each training sample got when it was last trained on
(:class:`~kd_lightning.per_sample.PerSampleStore`, keyed by the batch's stable ``index``), as PS-KD's code does,
not a snapshot of last epoch's weights: the store costs N x C floats and no compute, while a
snapshot needs a second network in memory and one more forward pass per step. The store is saved in
checkpoints (exact resume) and, under DDP, every rank gathers all ranks' indices and logits each
step so each holds the whole store (the next epoch reshuffles samples across ranks). A sample with
no stored prediction yet (all of epoch 0) gets its one-hot label as progressive target, as in
PS-KD's code: with tau_P = 1 the term is then plain cross-entropy, i.e. the progressive
distillation is off in the first epoch.

The critic's schedule (``critic_steps`` updates per student step, its Adam's ``critic_lr``/``critic_betas``, a
warm-up with the adversarial term off) is ours where the paper is silent; every epoch logs the critic's W estimate
(``train/wasserstein_epoch``) and cos(adversarial, guide) of the gradients w.r.t. the student's logits
(``train/adv_guide_cos``), and a critic whose W stays negative is warned about.

Optimisation is manual (two optimisers): the student's optimiser and LR scheduler come from the
recipe (``optimizer``/``lr_scheduler``; the scheduler is stepped here after each epoch's last batch), the critic's
from ``critic_optimizer``. In manual mode the Trainer's ``gradient_clip_val`` and
``accumulate_grad_batches`` are not available; ``global_step`` counts both optimisers' steps. Under
DDP use ``strategy: ddp_find_unused_parameters_true`` when the critic is on (its step does not use
the student's parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn

from kd_lightning.data.mixing import BatchMixer, MixedBatch
from kd_lightning.errors import ConfigError
from kd_lightning.gans.critic import LogitCritic, adversarial_loss, wgan_gp_critic_parts
from kd_lightning.losses.base import Outputs
from kd_lightning.losses.self_kd import ProgressiveKL, SelfKDTerm

if TYPE_CHECKING:
    from kd_lightning.methods.supervised import ImageClassifier as _Base
    from kd_lightning.teachers.frozen import FrozenTeacher
else:
    _Base = object  # a mixin: SelfKD puts ImageClassifier after it

STORE_KEY = "kdl_self_kd_store"  # where checkpoints before the terms kept the store


class SelfKDTraining(_Base):
    """The training half of :class:`~kd_lightning.methods.self_kd.SelfKD` (a mixin; it builds nothing).

    It reads what ``SelfKD.configure_models`` builds: ``terms`` (the self-distillation terms in the order of the
    sum), ``critic``, ``guide`` (S_sup) and ``mixer``, and the W monitor's counters ``SelfKD.__init__`` sets.
    """

    terms: nn.ModuleDict
    critic: LogitCritic | None
    guide: FrozenTeacher | None
    mixer: BatchMixer
    critic_optimizer_factory: OptimizerCallable
    _wasserstein_sum: torch.Tensor | float
    _wasserstein_count: int
    _negative_w_epochs: int
    _warned_critic_lost: bool

    # ------------------------------------------------------------------ optimisers (manual optimisation)
    def trainable_parameters(self) -> Iterable[torch.Tensor]:
        return (p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("critic."))

    def configure_optimizers(self) -> OptimizerLRScheduler:
        student = self.optimizer_factory(self.trainable_parameters())
        optimizers = [student]
        if self.critic is not None:
            optimizers.append(self.critic_optimizer_factory(self.critic.parameters()))
        if self.lr_scheduler_factory is None:
            return optimizers
        scheduler = {"scheduler": self.build_scheduler(student), "interval": "epoch"}
        return cast(OptimizerLRScheduler, (optimizers, [scheduler]))

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the store moved into the progressive term kept it under ``STORE_KEY``."""
        legacy = checkpoint.pop(STORE_KEY, None)
        key = "terms.progressive._extra_state"
        if legacy is not None and self._progressive() is not None and key not in checkpoint.get("state_dict", {}):
            checkpoint["state_dict"][key] = {"fields": {"logits": legacy["logits"]}, "seen": legacy["seen"]}
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ loss
    @property
    def term_map(self) -> dict[str, SelfKDTerm]:
        """The terms by name, in the order of the sum (a typed view of the ``terms`` ModuleDict)."""
        return cast("dict[str, SelfKDTerm]", dict(self.terms.items()))

    def _progressive(self) -> ProgressiveKL | None:
        term = dict(self.terms.items()).get("progressive")
        return term if isinstance(term, ProgressiveKL) else None

    @property
    def progressive(self) -> ProgressiveKL:
        """The progressive term (its ``store`` holds every sample's last predictions)."""
        term = self._progressive()
        if term is None:
            raise AttributeError(f"{type(self).__name__} has no progressive term (progressive_weight is 0)")
        return term

    def _epoch_and_max(self) -> tuple[int, int | None]:
        if self._trainer is None:
            return 0, None
        return self.current_epoch, self.trainer.max_epochs

    def progressive_weight_now(self) -> float:
        """a_P at the current epoch (PS-KD ramp: ``a_P (epoch + 1) / max_epochs``)."""
        term = self._progressive()
        return term.weight_at(*self._epoch_and_max()) if term is not None else 0.0

    def loss_weights(self) -> dict[str, float]:
        """The weight of every part at the current epoch (``ce`` = 1 minus the weights the terms take from it)."""
        epoch = self._epoch_and_max()
        weights = {name: term.weight_at(*epoch) for name, term in self.term_map.items()}
        ce = 1.0
        for name, term in self.term_map.items():
            if term.shares_ce_weight:
                ce -= weights[name]
        adv = float(self.hparams.adversarial_weight) if self.adversarial_on() else 0.0
        return {"ce": ce, **weights, "adv": adv}

    def student_steps_done(self) -> int:
        """Student optimiser steps taken before this batch (one per training batch; restored on resume)."""
        if self._trainer is None:
            return 0
        return max(0, self.trainer.fit_loop.epoch_loop.total_batch_idx)

    def adversarial_on(self) -> bool:
        """False during the critic's warm-up (``critic_warmup_steps`` student steps or ``critic_warmup_epochs``).

        The critic trains during the warm-up; only the student's adversarial term is off.
        """
        hp = self.hparams
        if hp.critic_warmup_epochs > 0:
            return self._epoch_and_max()[0] >= hp.critic_warmup_epochs
        if hp.critic_warmup_steps > 0:
            return self.student_steps_done() >= hp.critic_warmup_steps
        return True

    def student_parts(
        self,
        logits: torch.Tensor,
        mixed: MixedBatch,
        index: torch.Tensor | None = None,
        guide_logits: torch.Tensor | None = None,
        pair_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unweighted loss parts of the student: ``ce``, every term's (the KL parts include their ``T^2``), ``adv``.

        ``index`` keys the progressive store (default ``0..N-1``); ``guide_logits`` are S_sup's on the same images.
        """
        hp = self.hparams
        parts = {"ce": mixed.cross_entropy(logits, hp.label_smoothing)}
        if index is None:
            index = torch.arange(len(logits), device=logits.device)
        batch = {"mixed": mixed, "label": mixed.label, "index": index, "pair_logits": pair_logits}
        student = Outputs(logits)
        teacher = Outputs(guide_logits) if guide_logits is not None else None
        for name, term in self.terms.items():
            if term.needs_teacher and teacher is None:
                continue
            parts[name] = term(student, teacher, batch)
        if self.critic is not None:
            assert guide_logits is not None
            parts["adv"] = adversarial_loss(self.critic, logits, guide_logits, joint=hp.critic_norm == "joint")
        return parts

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_k weight_k * part_k`` with :meth:`loss_weights`."""
        weights = self.loss_weights()
        return cast(torch.Tensor, sum(weights[k] * v for k, v in parts.items()))  # parts holds "ce" at least

    def critic_parts(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """WGAN-GP critic loss ``E[D(fake)] - E[D(real)] + gp_weight * GP`` (:func:`wgan_gp_critic_parts`)."""
        assert self.critic is not None
        hp = self.hparams
        return wgan_gp_critic_parts(self.critic, real, fake, hp.gp_weight, joint=hp.critic_norm == "joint")

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        student_opt = optimizers[0]
        label, index = batch["label"], batch["index"]
        pair = batch.get("pair_image")
        needs_pairs = [name for name, t in self.terms.items() if t.needs_pairs]
        if needs_pairs and pair is None:
            raise ConfigError(
                f"the {', '.join(needs_pairs)} term (class_wise_weight={hp.class_wise_weight}) needs same-class "
                "partners in the batch: set data.init_args.class_pairs: true"
            )
        mixed = self.mixer(batch["image"], label, pair if needs_pairs else None)

        with torch.no_grad():
            guide_logits = self.guide(mixed.image) if self.guide is not None else None
            pair_logits = self(mixed.pair_image) if mixed.pair_image is not None else None
        logits = self(mixed.image)

        if self.critic is not None:
            assert guide_logits is not None
            self.critic_update(optimizers[1], guide_logits, logits.detach())

        with self.toggled_optimizer(student_opt):
            parts = self.student_parts(logits, mixed, index, guide_logits, pair_logits)
            loss = self.combine(parts)
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
            self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=True)
            if "adv" in parts and "guide" in parts:
                cos = self.adversarial_guide_cosine(logits, parts["adv"], parts["guide"])
                self.log("train/adv_guide_cos", cos, on_step=False, on_epoch=True)
            if self.critic is not None:
                self.log("train/adv_weight", self.loss_weights()["adv"], on_step=False, on_epoch=True)
            if hp.progressive_ramp:
                self.log("train/progressive_weight", self.progressive_weight_now(), on_step=False, on_epoch=True)
            student_opt.zero_grad()
            self.manual_backward(loss)
            student_opt.step()

        if any(t.uses_indices for t in self.terms.values()):
            self.remember(index, self._clean_logits(batch["image"]) if mixed.mixed else logits)
        self.train_metrics.update(logits.detach(), label)
        self.log_metrics("train", self.train_metrics)
        self._step_schedulers_at_epoch_end(batch_idx)
        return loss.detach()

    def critic_update(self, critic_opt: Any, real: torch.Tensor, fake: torch.Tensor) -> None:  # noqa: ANN401
        """``critic_steps`` WGAN-GP updates of the critic on this batch: S_sup's logits vs the student's (detached).

        Every update draws its own penalty mix ``eps``; the batch is the same (one student step's logits). The
        logged ``train/critic``, ``train/wasserstein`` and ``train/gp`` are those of the first update, i.e. of
        the critic as it was when the student's new logits arrived: W = E[D(S_sup)] - E[D(S_t)] below zero
        means the student's logits score higher than S_sup's, the critic has fallen behind.
        """
        with self.toggled_optimizer(critic_opt):
            for k in range(self.hparams.critic_steps):
                c_parts = self.critic_parts(real, fake)
                if k == 0:
                    self.log_dict({f"train/{n}": v.detach() for n, v in c_parts.items()}, on_step=True, on_epoch=True)
                    self._wasserstein_sum = self._wasserstein_sum + c_parts["wasserstein"].detach().double()
                    self._wasserstein_count += 1
                critic_opt.zero_grad()
                self.manual_backward(c_parts["critic"])
                critic_opt.step()

    @staticmethod
    def adversarial_guide_cosine(logits: torch.Tensor, adv: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """cos(grad of ``adv``, grad of ``guide``) w.r.t. the student's logits (the whole batch as one vector).

        Positive: the critic pushes the student the way the guide does (toward S_sup); negative: away from it.
        Gradients w.r.t. the logits only, so this costs two small backward passes, not through the network.
        """
        g_adv, g_guide = (
            torch.autograd.grad(part, logits, retain_graph=True, allow_unused=True)[0] for part in (adv, guide)
        )
        if g_adv is None or g_guide is None:
            return torch.tensor(float("nan"))
        return F.cosine_similarity(g_adv.detach().flatten().float(), g_guide.detach().flatten().float(), dim=0)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._wasserstein_sum, self._wasserstein_count = 0.0, 0

    def on_train_epoch_end(self) -> None:
        """Warn (once, rank zero) when the epoch-mean W has been negative ``critic_lost_epochs`` epochs in a row."""
        super().on_train_epoch_end()
        if self._wasserstein_count == 0:
            return
        mean_w = float(self._wasserstein_sum) / self._wasserstein_count  # the epoch's one host sync
        self._negative_w_epochs = self._negative_w_epochs + 1 if mean_w < 0 else 0
        patience = int(self.hparams.critic_lost_epochs)
        if patience and self._negative_w_epochs >= patience and not self._warned_critic_lost:
            self._warned_critic_lost = True
            hp = self.hparams
            rank_zero_warn(
                f"AI-KD's critic has lost: the Wasserstein estimate W = E[D(S_sup)] - E[D(S_t)] was negative for "
                f"{self._negative_w_epochs} epochs in a row (last epoch {mean_w:.3g}), so the adversarial term pushes "
                f"the student away from S_sup; give the critic more updates or a higher LR (critic_steps="
                f"{hp.critic_steps}, critic_lr={hp.critic_lr}) or a warm-up (critic_warmup_epochs)"
            )

    @torch.no_grad()
    def _clean_logits(self, image: torch.Tensor) -> torch.Tensor:
        """The student's eval-mode logits on un-mixed images (for the store under Mixup/CutMix)."""
        was_training = self.net.training
        self.net.eval()
        try:
            return self(image)
        finally:
            self.net.train(was_training)

    def remember(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Hand this step's logits to the terms (:meth:`SelfKDTerm.after_step`) under their sample indices.

        Under DDP they are gathered from every rank first, so each rank's store holds every sample.
        """
        index, logits = index.detach(), logits.detach().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            index = cast(torch.Tensor, self.all_gather(index)).reshape(-1)
            logits = cast(torch.Tensor, self.all_gather(logits)).reshape(-1, logits.shape[-1])
        for term in self.terms.values():
            cast(SelfKDTerm, term).after_step(index, logits)

    def _step_schedulers_at_epoch_end(self, batch_idx: int) -> None:
        """Step the epoch schedulers after the epoch's last batch, before validation and its checkpoint.

        That is where Lightning steps them in automatic optimisation, so a resumed run has the same learning rates.
        """
        if not (self.trainer.is_last_batch or batch_idx + 1 >= self.trainer.num_training_batches):
            return
        scheduler = self.lr_schedulers()
        for s in scheduler if isinstance(scheduler, list) else [scheduler]:
            if s is not None:
                s.step()


__all__ = ["STORE_KEY", "SelfKDTraining"]
