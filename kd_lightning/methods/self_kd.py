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

How it trains (the per-sample store p_{t-1}, the critic's schedule, manual optimisation) is
:mod:`kd_lightning.methods.self_kd_training`; PS-KD, CS-KD and TF-KD are :mod:`kd_lightning.methods.self_kd_baselines`.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import yaml
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.data.mixing import BatchMixer, MixMode
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
from kd_lightning.methods.self_kd_training import STORE_KEY, SelfKDTraining
from kd_lightning.methods.supervised import ImageClassifier

if TYPE_CHECKING:
    from kd_lightning.teachers.frozen import FrozenTeacher


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
class SelfKD(SelfKDTraining, ImageClassifier):
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


def __getattr__(name: str) -> Any:  # noqa: ANN401
    """``kd_lightning.methods.self_kd.PSKD`` (and CSKD, TFKD), the paths before the baselines moved, still resolve.

    A lazy alias for old class paths and imports, not a dependency of this module (the baselines import it).
    """
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module("kd_lightning.methods.self_kd_baselines"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED = ("CSKD", "PSKD", "TFKD")

__all__ = [
    "AIKD",
    "STORE_KEY",
    "LogitCritic",
    "SelfKD",
    "adversarial_loss",
    "critic_scores",
    "default_critic_optimizer",
    "pretrained_seed",
    "wgan_gp_critic_parts",
]
