"""MEKD (Ma et al., CVPR 2024): black-box distillation through a generator.

Two stages, each a LightningModule trained by ``kdl fit``; the teacher is a black box (a ``kdl serve-teacher``
URL or a checkpoint answered in-process, see :mod:`kd_lightning.teachers.blackbox`) that returns soft
(probabilities) or hard (class id) answers, with every image it answers counted against ``query_budget``:

1. :class:`MEKDDeprivatization` — a DCGAN with a C-dimensional latent (C = classes) on the edge's unlabelled
   images, the generator minimising ``L_G + alpha * L_IM`` (eqs. 10-13), where
   ``L_IM = -mean(y_t * log D(G(z)))`` and ``y_t`` is the teacher's highest probability for G(z) (soft) or 1
   (hard). The images of each L_IM batch are queries.
2. :class:`MEKD` — the generator frozen, query images x' = G(z) from a fixed latent pool, and the student trained on
   ``L = L_F + beta * KL`` (eq. 14): ``L_F = ||G(S(x')/tau) - G(T(x')/tau)||_F`` with F = 1 or 2 and
   ``KL(T(x') || S(x'))``; no ground-truth label anywhere.

The student template (:class:`~kd_lightning.methods.blackbox_student.BlackBoxStudent`) is shared with the
baselines of :mod:`kd_lightning.methods.blackbox_baselines` (:class:`BlackBoxKD`: KD/hard-label KD/ML/DKD at the
same budget; KN, AL, DAFL, AM, DB3KD); the frozen generator is :class:`~kd_lightning.teachers.FrozenGenerator`.
Those names stay importable from here. See docs/mekd.md for every choice that differs from the paper or the
official code.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.gans import Generator, MEKDDiscriminator, MEKDGenerator, g_loss
from kd_lightning.methods.blackbox_baselines.kd import BlackBoxKD
from kd_lightning.methods.blackbox_student import (
    BlackBoxStudent,
    PoolCache,
    TeacherLink,
    answer_logits,
    check_choice,
)
from kd_lightning.methods.gan import DCGAN
from kd_lightning.teachers.blackbox import QueryClient, Responses, WireDType
from kd_lightning.teachers.frozen_generator import FrozenGenerator, load_frozen_generator


# ---------------------------------------------------------------------------- stage 1: deprivatization
class MEKDDeprivatization(DCGAN):
    """DCGAN with latent = classes, trained on the edge's unlabelled images with ``L_G + alpha L_IM`` (eqs. 10-13).

    Args:
        teacher: the black-box teacher: a ``kdl serve-teacher`` URL or a classifier checkpoint answered in-process.
        responses: ``"soft"`` or ``"hard"`` answers.
        alpha: weight of L_IM (paper and code: 0.5; 0 gives the plain GAN and sends no query).
        query_budget: most images this stage may send (journalled restarts included); ``None``: unlimited.
        im_interval: compute L_IM (and query) every this many generator steps.
        im_batch_size: images of the generator batch that are queried for L_IM (``None``: all).
        nets: ``"dcgan"`` (:class:`~kd_lightning.gans.DCGANGenerator`, the DCGAN stage's nets) or ``"official"``
            (:class:`~kd_lightning.gans.MEKDGenerator`/``MEKDDiscriminator``, the official code's layout).
        official_width: channel multiplier of the official layout.
        journal: query journal path (``None``: ``<default_root_dir>/queries/journal.bin``; ``""``: no journal).
        token: bearer token for a URL teacher (``None``: env ``KDL_TEACHER_TOKEN``).
        timeout: seconds per HTTP request.
        wire_dtype: how images travel (``"uint8"``, ``"float16"``, ``"float32"``).
        **kwargs: see :class:`~kd_lightning.methods.gan.DCGAN` (``z_dim`` defaults to ``num_classes`` here).
    """

    def __init__(
        self,
        teacher: str,
        responses: Responses = "soft",
        alpha: float = 0.5,
        query_budget: int | None = None,
        im_interval: int = 1,
        im_batch_size: int | None = None,
        nets: Literal["dcgan", "official"] = "dcgan",
        official_width: float = 1.0,
        journal: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        wire_dtype: WireDType = "uint8",
        z_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("responses", responses, ("soft", "hard"))
        check_choice("nets", nets, ("dcgan", "official"))
        if alpha < 0 or im_interval < 1 or (im_batch_size is not None and im_batch_size < 1):
            raise ConfigError(
                f"alpha={alpha}, im_interval={im_interval}, im_batch_size={im_batch_size}; expected alpha >= 0, "
                "im_interval >= 1 and im_batch_size >= 1 or null"
            )
        if z_dim is None:  # MEKD: the latent has as many dimensions as there are classes
            if kwargs.get("num_classes") is None:
                raise ConfigError("MEKDDeprivatization needs num_classes (kdl links it) or z_dim")
            z_dim = int(kwargs["num_classes"])
        super().__init__(z_dim=z_dim, **kwargs)
        self.link = TeacherLink(self, {"stage": "deprivatization"})

    def configure_models(self) -> None:
        if self.hparams.get("z_dim") is None:  # kdl's CLI records the config's null; resolve it here too
            # (the logged copy has no public setter: tests/test_lightning_internals.py pins _hparams_initial)
            for hp in (self.hparams, getattr(self, "_hparams_initial", {})):
                hp["z_dim"] = int(self.hparams.num_classes)
        super().configure_models()

    def build_nets(self) -> tuple[Generator, nn.Module]:
        hp = self.hparams
        if hp.nets == "official":
            return (
                MEKDGenerator(hp.z_dim, hp.image_size, hp.in_channels, hp.official_width),
                MEKDDiscriminator(hp.image_size, hp.in_channels, hp.official_width),
            )
        return super().build_nets()

    def on_fit_start(self) -> None:
        if self.hparams.alpha > 0:
            client = self.link.connect(self.hparams.num_classes)
            try:
                self.check_im_budget(client)
            except ConfigError:
                self.link.close()
                raise

    def planned_generator_steps(self) -> int:
        """Generator steps this fit will make (``trainer.max_steps`` counts D and G steps both)."""
        hp, trainer = self.hparams, self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps * hp.n_gen // (hp.n_critic + hp.n_gen)
        batches = int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 0
        return (trainer.max_epochs or 0) * batches * hp.n_gen // hp.n_critic

    def check_im_budget(self, client: QueryClient) -> None:
        """Print the queries L_IM will pay for this fit, and refuse to start when they exceed the budget."""
        hp = self.hparams
        dm = getattr(self.trainer, "datamodule", None)
        batch = int(getattr(dm, "batch_size", 0) or 0)
        train = getattr(dm, "train_dataset", None)
        if train is not None and hasattr(train, "__len__"):
            batch = min(batch, len(train))  # a training set smaller than a batch gives smaller batches
        steps = self.planned_generator_steps() - int(self.g_steps)
        need = im_queries(steps, batch, hp.im_interval, hp.im_batch_size)
        spent = int(client.refresh_stats().journal_spent)
        budget = "unlimited" if hp.query_budget is None else f"{hp.query_budget:,}"
        print(
            f"MEKD deprivatization: L_IM queries the teacher on {min(batch, hp.im_batch_size or batch)} images every "
            f"{hp.im_interval} generator step(s): {steps:,} generator steps -> about {need:,} queries "
            f"({spent:,} already spent; budget {budget})"
        )
        if hp.query_budget is not None and spent + need > hp.query_budget:
            raise ConfigError(
                f"L_IM needs about {need:,} teacher queries for {steps:,} generator steps (batch {batch}, "
                f"im_interval={hp.im_interval}, im_batch_size={hp.im_batch_size}) but query_budget={hp.query_budget:,}"
                f" leaves {hp.query_budget - spent:,}: raise the budget, or query less (im_interval, im_batch_size)"
            )

    def on_fit_end(self) -> None:
        self.link.finish()

    # ``kdl test`` on a deprivatization checkpoint runs the generator gate (callbacks/generator_gate.py): the
    # test loop itself does nothing but give the callback its place, with the teacher connected.
    def on_test_start(self) -> None:
        self.link.connect(self.hparams.num_classes)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        return None

    def on_test_end(self) -> None:
        self.link.finish()

    def on_train_epoch_end(self) -> None:
        stats = self.link.write_stats()
        if stats:
            self.log("queries/spent", float(stats["journal_spent"]))

    def generator_step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        fake = self.generator(self.noise(len(batch["image"])))
        d = self.d_logits(fake, None)
        loss = g_loss(d, hp.loss)
        if hp.alpha > 0 and int(self.g_steps) % hp.im_interval == 0:
            k = min(len(fake), hp.im_batch_size or len(fake))
            client = self.link.client
            if client is None:
                raise RuntimeError("MEKDDeprivatization: the teacher is not connected (on_fit_start has not run)")
            answers = client.query(((fake[:k].detach() + 1) / 2).clamp(0, 1))
            conf = answers.max(-1).values.float() if hp.responses == "soft" else torch.ones(k, device=fake.device)
            l_im = -(conf.to(d.device) * F.logsigmoid(d[:k])).mean()
            self.log("train/im_loss", l_im.detach(), on_step=True, on_epoch=True)
            self.log("train/teacher_confidence", conf.mean(), on_step=False, on_epoch=True)
            loss = loss + hp.alpha * l_im
        return loss


def im_queries(generator_steps: int, batch_size: int, im_interval: int = 1, im_batch_size: int | None = None) -> int:
    """Teacher queries L_IM pays for ``generator_steps`` steps: ``ceil(steps / im_interval) * images per step``.

    The paper's weighting (every step, the whole batch) is ``steps * batch_size``: 4,800 steps of 64 images are
    307,200 queries, the official code's ~16.5k steps ~1.06M.
    """
    per_step = min(batch_size, im_batch_size or batch_size)
    return -(-max(generator_steps, 0) // im_interval) * per_step


# ---------------------------------------------------------------------------- stage 2: MEKD
class MEKD(BlackBoxStudent):
    """Mapping-emulation KD (eq. 14): ``||G(S(x')/tau) - G(T(x')/tau)||_F + beta KL(T(x') || S(x'))``, x' = G(z).

    Args:
        generator: checkpoint of the deprivatization stage (or any DCGAN with ``z_dim`` = classes); frozen here.
            The same generator makes the query images x' = G(z) (see :class:`BlackBoxStudent`).
        tau: temperature of the generator input and of the KL (official code: 5).
        beta: weight of the KL term (paper and code: 1).
        lf_weight: weight of L_F (code: 1).
        norm: F in L_F: 1 or 2.
        lf_reduction: ``"sample_norm"`` (paper: the F-norm of each image's difference, averaged over the batch) or
            ``"mean"`` (official code: ``L1Loss``/``MSELoss``, the mean over every pixel).
        kl_scale: factor of the KL: ``"tau"`` (official code), ``"tau2"`` (Hinton's T^2) or ``"none"``.
        generator_input: ``"logits"`` (official code: logits / tau) or ``"softmax"`` (softmax(logits / tau)).
        ema_generator: use the deprivatization stage's EMA generator (else the raw one).
        **kwargs: see :class:`BlackBoxStudent`.
    """

    def __init__(
        self,
        generator: str,
        tau: float = 5.0,
        beta: float = 1.0,
        lf_weight: float = 1.0,
        norm: Literal[1, 2] = 1,
        lf_reduction: Literal["sample_norm", "mean"] = "sample_norm",
        kl_scale: Literal["tau", "tau2", "none"] = "tau",
        generator_input: Literal["logits", "softmax"] = "logits",
        hard_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if tau <= 0 or beta < 0 or lf_weight < 0:
            raise ConfigError(f"tau={tau}, beta={beta}, lf_weight={lf_weight}; expected tau > 0, weights >= 0")
        check_choice("norm", norm, (1, 2))
        check_choice("lf_reduction", lf_reduction, ("sample_norm", "mean"))
        check_choice("kl_scale", kl_scale, ("tau", "tau2", "none"))
        check_choice("generator_input", generator_input, ("logits", "softmax"))
        if hard_scale <= 0:
            raise ConfigError(f"hard_scale={hard_scale}; expected a number > 0 (1: the official one-hot)")
        super().__init__(generator=generator, **kwargs)
        self.teacher_cache = PoolCache()  # G(T(x')/tau) per pool item: the answers are fixed, so is the image

    def on_fit_start(self) -> None:
        self.teacher_cache.clear()
        super().on_fit_start()

    def _teacher_image(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.generator(self._gen_input(t))

    def _gen_input(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits / self.hparams.tau
        return F.softmax(z, -1) if self.hparams.generator_input == "softmax" else z

    def distill_loss(self, x: torch.Tensor, student: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        t = answer_logits(answers, hp.responses, hp.num_classes).to(student.device)
        if hp.responses == "hard":
            t = t * hp.hard_scale
        s = student - student.mean(-1, keepdim=True) if hp.responses == "soft" else student
        index = self.pool_index  # set in training: the teacher's side of a pool item is computed once per fit
        g_t = self._teacher_image(t) if index is None else self.teacher_cache.get(index, lambda: self._teacher_image(t))
        diff = (self.generator(self._gen_input(s)) - g_t).flatten(1)
        if hp.lf_reduction == "mean":
            lf = diff.abs().mean() if hp.norm == 1 else diff.pow(2).mean()
        else:
            lf = diff.norm(p=hp.norm, dim=1).mean()
        scale = {"tau": hp.tau, "tau2": hp.tau**2, "none": 1.0}[hp.kl_scale]
        kl = F.kl_div(F.log_softmax(s / hp.tau, -1), F.softmax(t / hp.tau, -1), reduction="batchmean") * scale
        return {"lf": hp.lf_weight * lf, "kl": hp.beta * kl}


__all__ = [
    "MEKD",
    "BlackBoxKD",
    "BlackBoxStudent",
    "FrozenGenerator",
    "MEKDDeprivatization",
    "TeacherLink",
    "answer_logits",
    "im_queries",
    "load_frozen_generator",
]
