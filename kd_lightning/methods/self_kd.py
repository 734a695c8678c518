"""Self-knowledge distillation: AI-KD (Kim et al.) and the baselines it compares with, as one module.

:class:`SelfKD` trains a classifier with any weighted sum of these terms (all share one code path)::

    L = (1 - a_P(t) - a_G) CE                                 cross-entropy (mixed labels under Mixup/CutMix)
      + a_P(t) tau_P^2 KL(p_{t-1}(x; tau_P) || p_t(x; tau_P))  progressive: last epoch's own predictions
      + a_G tau_G^2 KL(p_sup(x; tau_G) || p_t(x; tau_G))       guide: a frozen pre-trained copy S_sup
      + lambda_cls T_cls^2 KL(p_t(x'; T_cls) || p_t(x; T_cls))  class-wise: a same-class partner x' (CS-KD)
      + w L_A,  L_A = -E[D(S_t(x))]                            adversarial: a WGAN-GP critic D on logits

and the critic D (FC(C->64)-BN1d-LeakyReLU-FC(64->32)-LeakyReLU-FC(32->1), Adam lr 1e-4) minimises
``E[D(S_t(x))] - E[D(S_sup(x))] + 10 * GP`` against S_sup's logits. ``critic_norm`` says how the BN sees the
logits: ``joint`` (default) passes S_sup's, the student's and the penalty's mixed logits through the critic as ONE
batch, so they share the BN statistics and the critic can tell logits apart that differ only by an offset or a
scale; ``none`` drops the BN (WGAN-GP's advice for critics); ``separate`` passes each set as its own batch, which
normalises each by its own statistics, so ``D(x) = D(x + c) = D(2x + c)`` and the student gets no gradient toward
S_sup's offset or confidence (kept only to reproduce runs made before the fix). The named subclasses only set
defaults: :class:`AIKD` (a_G 0.1, a_P 0.3, tau_G 3, tau_P 1, w 0.1), :class:`PSKD` (a_P ramped
linearly to 0.8), :class:`CSKD` (lambda 1, T 4, needs ``data.class_pairs``), :class:`TFKD`
(self-training: a_G 0.95, tau_G 6 from a pre-trained copy; or ``variant: regularization``, the manually designed
teacher, ``guide_target: designed``). The paper's ablations are settings:
"No Adv" ``adversarial_weight: 0``, "Only Progressive" ``guide_weight: 0, adversarial_weight: 0``,
"Only Guide" ``progressive_weight: 0, adversarial_weight: 0``.

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

import os
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn

from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.data.mixing import BatchMixer, MixedBatch, MixMode
from kd_lightning.errors import CheckpointError, ConfigError
from kd_lightning.gans.critic import (
    CRITIC_ADAM_DEFAULTS,
    CRITIC_NORMS,
    CriticNorm,
    LogitCritic,
    adversarial_loss,
    check_critic_schedule,
    critic_scores,
    default_critic_optimizer,
    wgan_gp_critic_parts,
)
from kd_lightning.losses.base import Outputs
from kd_lightning.losses.self_kd import (
    ClassWiseKL,
    GuideKL,
    GuideTarget,
    KLReduction,
    ProgressiveKL,
    SelfKDTerm,
    check_guide_settings,
    check_temperature,
)
from kd_lightning.methods.base import checked_scheduler
from kd_lightning.methods.supervised import ImageClassifier

if TYPE_CHECKING:
    from kd_lightning.teachers.frozen import FrozenTeacher

STORE_KEY = "kdl_self_kd_store"  # where checkpoints before the terms kept the store


def pretrained_seed(path: str) -> int | None:
    """The ``seed_everything`` of the run that wrote checkpoint ``path``, or None when it is not recorded.

    Read from the run's saved ``config.yaml`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/*/version_*/config.yaml``,
    and ``<run>/config.yaml``); None when there is none or the saved configs disagree.
    """
    run = Path(path).resolve().parent.parent
    found: set[int] = set()
    for cfg in [run / "config.yaml", *sorted(run.glob("*/version_*/config.yaml"))]:
        if not cfg.is_file():
            continue
        try:
            seed = (yaml.safe_load(cfg.read_text()) or {}).get("seed_everything")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(seed, int) and not isinstance(seed, bool):
            found.add(seed)
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------------------------------- module
class SelfKD(ImageClassifier):
    """Self-distillation with progressive, guide, class-wise and adversarial terms (see the module doc).

    Every weight defaults to 0 here (plain cross-entropy); :class:`AIKD`, :class:`PSKD`,
    :class:`CSKD` and :class:`TFKD` are this class with other defaults.

    Args:
        pretrained: ``kdl`` checkpoint of S_sup, a supervised model of the same net and classes
            (``ImageClassifier``; e.g. ``runs/cub200/teacher/checkpoints/best.ckpt``). Needed by
            the guide and adversarial terms.
        guide_weight: a_G, weight of ``tau_G^2 KL(p_sup || p_t)``.
        guide_temperature: tau_G.
        guide_target: ``pretrained`` (S_sup, as above) or ``designed``: TF-KD_reg's manually designed teacher
            (:func:`designed_teacher`), whose term is ``KL(p^d_tau || p_t(x; tau))`` without ``tau^2`` (TF-KD
            Eq. 9 and its code); needs no ``pretrained``.
        designed_correct_prob: a of the designed teacher (0.99, the official code's).
        designed_tempered_student: the student at tau_G in the designed term (the paper's ``p_tau``); the official
            code compares with the student's plain ``log_softmax`` (false).
        guide_reduction: ``batchmean`` (KL summed over classes, averaged over the batch) or ``mean`` (also
            averaged over classes: ``nn.KLDivLoss()``'s default, which TF-KD's official code uses).
        guide_multiplier: factor on the guide term (TF-KD's ``multiplier``: 50 for its self-teacher runs, 100 for
            its regularisation runs, with ``guide_reduction: mean``).
        progressive_weight: a_P, weight of ``tau_P^2 KL(p_{t-1} || p_t)`` (its final value when ramped).
        progressive_temperature: tau_P.
        progressive_ramp: PS-KD's schedule ``a_P(t) = a_P (t + 1) / max_epochs``; else constant.
        adversarial_weight: w, weight of ``L_A = -E[D(S_t(x))]``; 0 builds no critic.
        critic_hidden: widths of the critic's two hidden FC layers.
        critic_norm: ``joint`` (default): the paper's BN1d, with S_sup's and the student's logits (and the
            penalty's mix) normalised as one batch; ``none``: no BN in the critic; ``separate``: the BN sees each
            set alone, which makes the critic blind to a logit offset or scale (the behaviour before this option).
        critic_optimizer: builds the critic's optimiser; default None: Adam with ``critic_lr`` and ``critic_betas``
            (giving both this and a non-default ``critic_lr``/``critic_betas`` is an error).
        critic_steps: critic updates per student step (5, WGAN-GP's n_critic; the paper does not say), each on this
            step's logits with its own penalty mix.
        critic_lr: the default Adam's learning rate (1e-3, our choice: the paper's 1e-4 lets the critic fall behind
            an SGD student; docs/distillation.md has the measurements).
        critic_betas: the default Adam's betas ((0, 0.9), WGAN-GP's; the paper does not say).
        critic_warmup_steps: student steps during which the critic trains but the adversarial term is off.
        critic_warmup_epochs: the same in epochs (set one of the two).
        critic_lost_epochs: warn once when the epoch-mean W = E[D(S_sup)] - E[D(S_t)] is negative this many epochs in
            a row (0: never).
        gp_weight: weight of the critic's gradient penalty.
        class_wise_weight: lambda of CS-KD's ``T^2 KL(p(x') || p(x))`` to a same-class partner x'
            (needs ``data.init_args.class_pairs: true``); added on top of the CE weight, as in CS-KD.
        class_wise_temperature: T of the class-wise term.
        mixing: batch augmentation ``none``, ``cutout``, ``mixup`` or ``cutmix``
            (:mod:`kd_lightning.data.mixing`).
        mix_alpha: Beta(alpha, alpha) of Mixup/CutMix.
        mix_prob: probability that a batch is mixed / cut out.
        cutout_size: Cutout square side in pixels (default half the image side).
        terms: more self-distillation terms (:class:`~kd_lightning.losses.self_kd.SelfKDTerm` subclasses, e.g.
            ``[{class_path: ProgressiveKL, init_args: {num_classes: 200, T: 2, weight: 0.1}}]``), computed after
            the ones the arguments above build.
        **kwargs: see :class:`~kd_lightning.methods.supervised.ImageClassifier`.

    The terms are :mod:`kd_lightning.losses.self_kd` losses (:class:`~kd_lightning.losses.self_kd.GuideKL`,
    :class:`~kd_lightning.losses.self_kd.ProgressiveKL`, :class:`~kd_lightning.losses.self_kd.ClassWiseKL`),
    built from the arguments above; this class adds the cross-entropy, the critic and its optimiser.

    Under Mixup/CutMix: CE uses the mixed labels; S_sup sees the same mixed images (guide and
    critic); the progressive targets are last epoch's predictions of the two source images mixed
    with the same lambda and permutation; CS-KD partners are mixed with the same lambda/permutation/box
    (so a mixed pair keeps its mixed label); and the store is updated with the student's eval-mode
    predictions on the un-mixed images (one extra forward pass without gradients), because a
    prediction on a mixed image is not a prediction of sample ``index``.
    """

    hparams_ignore = (*ImageClassifier.hparams_ignore, "critic_optimizer", "terms")  # terms: modules, in config.yaml
    #: read by the Compile callback: the WGAN-GP penalty differentiates the critic twice (``create_graph=True``)
    compile_refused: ClassVar[dict[str, str]] = {
        "critic": "its gradient penalty needs a double backward, which torch.compile does not support"
    }

    def __init__(
        self,
        pretrained: str | None = None,
        guide_weight: float = 0.0,
        guide_temperature: float = 3.0,
        guide_target: GuideTarget = "pretrained",
        designed_correct_prob: float = 0.99,
        designed_tempered_student: bool = True,
        guide_reduction: KLReduction = "batchmean",
        guide_multiplier: float = 1.0,
        progressive_weight: float = 0.0,
        progressive_temperature: float = 1.0,
        progressive_ramp: bool = False,
        adversarial_weight: float = 0.0,
        critic_hidden: tuple[int, int] = (64, 32),
        critic_norm: CriticNorm = "joint",
        critic_optimizer: OptimizerCallable | None = None,
        critic_steps: int = 5,
        critic_lr: float = 1e-3,
        critic_betas: tuple[float, float] = (0.0, 0.9),
        critic_warmup_steps: int = 0,
        critic_warmup_epochs: int = 0,
        critic_lost_epochs: int = 3,
        gp_weight: float = 10.0,
        class_wise_weight: float = 0.0,
        class_wise_temperature: float = 4.0,
        mixing: MixMode = "none",
        mix_alpha: float = 1.0,
        mix_prob: float = 1.0,
        cutout_size: int | None = None,
        terms: list[SelfKDTerm] | None = None,
        **kwargs: Any,
    ) -> None:
        for term in terms or []:
            if not isinstance(term, SelfKDTerm):
                raise ConfigError(f"terms: {term!r} is not a SelfKDTerm (see kd_lightning.losses.list_self_kd_terms())")
        for name, value in (
            ("guide_weight", guide_weight),
            ("progressive_weight", progressive_weight),
            ("adversarial_weight", adversarial_weight),
            ("class_wise_weight", class_wise_weight),
            ("gp_weight", gp_weight),
        ):
            if value < 0:
                raise ConfigError(f"{name}={value}; expected a weight >= 0")
        # the terms' own checks, before anything is built (configure_models builds the terms)
        check_guide_settings(guide_temperature, guide_target, designed_correct_prob, guide_reduction, guide_multiplier)
        check_temperature("progressive_temperature", progressive_temperature)
        check_temperature("class_wise_temperature", class_wise_temperature)
        check_critic_schedule(
            critic_steps, critic_lr, critic_betas, critic_warmup_steps, critic_warmup_epochs, critic_lost_epochs
        )
        if critic_optimizer is not None and (critic_lr, tuple(critic_betas)) != CRITIC_ADAM_DEFAULTS:
            raise ConfigError(
                f"critic_optimizer is given and so are critic_lr={critic_lr} / critic_betas={list(critic_betas)}: "
                "those set the default Adam only; put lr and betas in critic_optimizer's init_args instead"
            )
        if critic_norm not in CRITIC_NORMS:
            raise ConfigError(f"critic_norm={critic_norm!r}; expected one of {', '.join(CRITIC_NORMS)}")
        if guide_weight + progressive_weight > 1.0:
            raise ConfigError(
                f"guide_weight + progressive_weight = {guide_weight} + {progressive_weight} > 1: the cross-entropy "
                "weight 1 - a_P - a_G would be negative"
            )
        needs_ssup = (guide_weight > 0 and guide_target == "pretrained") or adversarial_weight > 0
        if needs_ssup and not pretrained:
            raise ConfigError(
                f"guide_weight={guide_weight} / adversarial_weight={adversarial_weight} need the pre-trained model "
                "S_sup: set model.init_args.pretrained to a kdl checkpoint of an ImageClassifier of the same net"
            )
        self._pending_terms = list(terms or [])  # registered by configure_models (nn.Module is not set up yet)
        super().__init__(**kwargs)
        self.critic_optimizer_factory: OptimizerCallable = critic_optimizer or partial(
            torch.optim.Adam, lr=critic_lr, betas=(float(critic_betas[0]), float(critic_betas[1]))
        )
        self.automatic_optimization = False
        # this epoch's W estimates (rank zero's), summed on the device in float64: no host sync per step
        self._wasserstein_sum: torch.Tensor | float = 0.0
        self._wasserstein_count = 0
        self._negative_w_epochs = 0  # consecutive epochs with a negative mean W
        self._warned_critic_lost = False

    # ------------------------------------------------------------------ template hooks
    def configure_models(self) -> None:
        super().configure_models()
        hp = self.hparams
        self.guide: FrozenTeacher | None = self._load_pretrained(hp.pretrained) if hp.pretrained else None
        self.critic = (
            LogitCritic(hp.num_classes, tuple(hp.critic_hidden), batch_norm=hp.critic_norm != "none")
            if hp.adversarial_weight > 0
            else None
        )
        self.terms = nn.ModuleDict()
        if hp.progressive_weight > 0:  # the order is the order of the sum in the loss (kept for exact reruns)
            self.terms["progressive"] = ProgressiveKL(
                hp.num_classes, hp.progressive_temperature, hp.progressive_weight, hp.progressive_ramp
            )
        if hp.guide_weight > 0:
            self.terms["guide"] = GuideKL(
                hp.guide_temperature,
                hp.guide_weight,
                hp.guide_target,
                hp.designed_correct_prob,
                hp.designed_tempered_student,
                hp.guide_reduction,
                hp.guide_multiplier,
            )
        if hp.class_wise_weight > 0:
            self.terms["class_wise"] = ClassWiseKL(hp.class_wise_temperature, hp.class_wise_weight)
        extra, self._pending_terms = self._pending_terms, []
        for term in extra:
            name = term.name
            if name in self.terms or name in ("ce", "adv"):
                raise ConfigError(f"terms: a second term named {name!r}; give each term its own name")
            if term.needs_teacher and self.guide is None:
                raise ConfigError(f"terms: {type(term).__name__} needs S_sup's outputs: set model.init_args.pretrained")
            self.terms[name] = term
        fill = torch.as_tensor(hp.mean or (0.5,), dtype=torch.float32)
        self.mixer = BatchMixer(hp.mixing, hp.mix_alpha, hp.mix_prob, hp.cutout_size, fill=fill)

    def _load_pretrained(self, path: str) -> FrozenTeacher:
        hp = self.hparams
        try:
            load_checkpoint(path)  # a clear message for a missing or unreadable file, before anything else
        except CheckpointError as e:
            raise CheckpointError(
                f"{type(self).__name__} needs the pre-trained model S_sup but {e}; train it first (e.g. "
                "kdl fit --config recipes/cub200/teacher.yaml) or set model.init_args.pretrained"
            ) from None
        from kd_lightning.teachers.frozen import FrozenTeacher  # here: teachers import methods.base

        guide = FrozenTeacher.from_checkpoint(path)
        if guide.net_name != hp.net:
            raise ConfigError(
                f"S_sup {path!r} is a {guide.net_name!r} but the student is net={hp.net!r}; self-distillation "
                "needs a pre-trained copy of the same architecture"
            )
        who, size = f"the student ({hp.net})", hp.get("image_size")
        guide.check_compatible("classification", hp.num_classes, hp.in_channels, who=who, image_size=size)
        return guide

    def trainable_parameters(self) -> Iterable[torch.Tensor]:
        return (p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("critic."))

    def configure_optimizers(self) -> OptimizerLRScheduler:
        student = self.optimizer_factory(self.trainable_parameters())
        optimizers = [student]
        if self.critic is not None:
            optimizers.append(self.critic_optimizer_factory(self.critic.parameters()))
        if self.lr_scheduler_factory is None:
            return optimizers
        scheduler = {"scheduler": checked_scheduler(self.lr_scheduler_factory(student)), "interval": "epoch"}
        return cast(OptimizerLRScheduler, (optimizers, [scheduler]))

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

    def _check_pretrained_seed(self, path: str) -> None:
        """Warn when S_sup was trained with this run's ``seed_everything``: the student would start from S_sup's init.

        Both are built by the same code from the same seed, so their initial weights are equal, and the student is
        then guided toward where its own initial weights went. Silent when S_sup's seed is not recorded.
        """
        run_seed = os.environ.get("PL_GLOBAL_SEED")
        ssup_seed = pretrained_seed(path)
        if run_seed is None or ssup_seed is None or int(run_seed) != ssup_seed:
            return
        rank_zero_warn(
            f"S_sup {path!r} was trained with seed_everything={ssup_seed}, the seed of this run: the student starts "
            "from S_sup's initial weights. Use the pre-trained model of another seed (e.g. seed + 1; "
            "recipes/pipelines/aikd_fashion_mnist_overfit.yaml pairs seed k with seed k+1's baseline)"
        )

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the store moved into the progressive term kept it under ``STORE_KEY``."""
        legacy = checkpoint.pop(STORE_KEY, None)
        key = "terms.progressive._extra_state"
        if legacy is not None and self._progressive() is not None and key not in checkpoint.get("state_dict", {}):
            checkpoint["state_dict"][key] = {"fields": {"logits": legacy["logits"]}, "seen": legacy["seen"]}
        super().on_load_checkpoint(checkpoint)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.pretrained:
            self._check_pretrained_seed(str(self.hparams.pretrained))
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if (
            stage == "fit"
            and any(t.needs_pairs for t in self.terms.values())
            and dm is not None
            and not getattr(dm, "class_pairs", False)
        ):
            raise ConfigError(
                f"class_wise_weight={self.hparams.class_wise_weight} (CS-KD) needs same-class partners: set "
                f"data.init_args.class_pairs: true ({type(dm).__name__} has class_pairs off)"
            )


class AIKD(SelfKD):
    """AI-KD: guide from S_sup, progressive from the last epoch, WGAN-GP critic (paper defaults).

    Args:
        pretrained: ``kdl`` checkpoint of S_sup (same net and classes).
        guide_weight: a_G (0.1). guide_temperature: tau_G (3).
        progressive_weight: a_P (0.3). progressive_temperature: tau_P (1).
        adversarial_weight: w (0.1).
        **kwargs: see :class:`SelfKD`.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        guide_weight: float = 0.1,
        guide_temperature: float = 3.0,
        progressive_weight: float = 0.3,
        progressive_temperature: float = 1.0,
        adversarial_weight: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            pretrained=pretrained,
            guide_weight=guide_weight,
            guide_temperature=guide_temperature,
            progressive_weight=progressive_weight,
            progressive_temperature=progressive_temperature,
            adversarial_weight=adversarial_weight,
            **kwargs,
        )


class PSKD(SelfKD):
    """PS-KD (Kim et al. 2021): targets ``(1 - a_t) y + a_t p_{t-1}``, ``a_t = 0.8 (t + 1) / max_epochs``.

    Its soft-target cross-entropy equals ``(1 - a_t) CE + a_t KL(p_{t-1} || p_t)`` plus a constant,
    so it is :class:`SelfKD` with a ramped progressive term at tau_P = 1.

    Args:
        progressive_weight: alpha_T (0.8). progressive_ramp: the linear ramp (on).
        **kwargs: see :class:`SelfKD`.
    """

    def __init__(self, progressive_weight: float = 0.8, progressive_ramp: bool = True, **kwargs: Any) -> None:
        super().__init__(progressive_weight=progressive_weight, progressive_ramp=progressive_ramp, **kwargs)


class CSKD(SelfKD):
    """CS-KD (Yun et al. 2020): ``CE + lambda T^2 KL(p(x') || p(x))`` with x' of the same class.

    Needs ``data.init_args.class_pairs: true``. As in the official code, the partners' predictions
    come from a no-gradient forward pass in training mode and CE is on the anchors only.

    Args:
        class_wise_weight: lambda (1). class_wise_temperature: T (4).
        **kwargs: see :class:`SelfKD`.
    """

    def __init__(self, class_wise_weight: float = 1.0, class_wise_temperature: float = 4.0, **kwargs: Any) -> None:
        super().__init__(class_wise_weight=class_wise_weight, class_wise_temperature=class_wise_temperature, **kwargs)


class TFKD(SelfKD):
    """TF-KD (Yuan et al. 2020), both variants of the official code.

    - ``self`` (self-training): ``(1 - a) CE + a T^2 KL(p_pre || p_t)`` from a pre-trained copy; defaults a = 0.95,
      T = 6 (the official ResNet-18 self-teacher setting; DenseNet-121's is a = 0.9, T = 20).
    - ``regularization`` (TF-KD_reg): ``(1 - a) CE + a KL(p^d_T || p_t(T))`` with the manually designed teacher
      ``p^d`` (true class 0.99, the rest uniform; :func:`designed_teacher`); defaults a = 0.1, T = 20 (the
      official ResNet-18 setting); needs no pre-trained copy.

    The KL is the usual batch mean by default; the official code's scale is ``guide_reduction: mean`` (also
    averaged over classes) with ``guide_multiplier`` 50 (self) or 100 (regularization), i.e. the official KD term
    is multiplier / C times ours (C = number of classes).

    Args:
        pretrained: ``kdl`` checkpoint of the pre-trained copy (same net and classes; ``self`` only).
        variant: ``self`` or ``regularization``.
        guide_weight: a (default 0.95 for ``self``, 0.1 for ``regularization``).
        guide_temperature: T (default 6 for ``self``, 20 for ``regularization``).
        **kwargs: see :class:`SelfKD`.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        variant: Literal["self", "regularization"] = "self",
        guide_weight: float | None = None,
        guide_temperature: float | None = None,
        **kwargs: Any,
    ) -> None:
        if variant not in ("self", "regularization"):
            raise ConfigError(f"TFKD variant={variant!r}; expected 'self' or 'regularization'")
        reg = variant == "regularization"
        kwargs["guide_target"] = "designed" if reg else kwargs.get("guide_target", "pretrained")
        # rebound here, not only passed on: save_hyperparameters reads this frame's values too
        guide_weight = (0.1 if reg else 0.95) if guide_weight is None else guide_weight
        guide_temperature = (20.0 if reg else 6.0) if guide_temperature is None else guide_temperature
        super().__init__(
            pretrained=pretrained, guide_weight=guide_weight, guide_temperature=guide_temperature, **kwargs
        )


__all__ = [
    "AIKD",
    "CSKD",
    "PSKD",
    "TFKD",
    "LogitCritic",
    "SelfKD",
    "adversarial_loss",
    "critic_scores",
    "default_critic_optimizer",
    "pretrained_seed",
    "wgan_gp_critic_parts",
]
