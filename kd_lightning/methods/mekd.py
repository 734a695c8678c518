"""MEKD (Ma et al., CVPR 2024): black-box distillation through a generator; and the black-box baselines.

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

:class:`BlackBoxKD` gives the baselines at the same budget, on queried local images (views of the edge's images):
KD on soft answers, KD on hard answers (cross-entropy on the teacher's class), ML (Ba & Caruana: L2 on logits)
and DKD — the last three reusing :class:`~kd_lightning.losses.BLKD` and :class:`~kd_lightning.losses.DKD`.

From answers to "logits": soft answers p give the teacher's logits up to a constant per image, so the teacher side is
the centred ``log p`` and the student side its centred logits (the same representative of each). Hard answers
become one-hot vectors used as logits (as the official code), facing the student's raw logits.
See docs/mekd.md for every choice that differs from the paper or the official code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.fileio import atomic_write_bytes
from kd_lightning.gans import Generator, MEKDDiscriminator, MEKDGenerator, g_loss
from kd_lightning.losses import BLKD, DKD
from kd_lightning.losses.base import Outputs
from kd_lightning.methods.base import BaseTask
from kd_lightning.methods.gan import DCGAN
from kd_lightning.methods.supervised import NetTask
from kd_lightning.metrics import classification_metrics
from kd_lightning.teachers.blackbox import QueryClient, Responses, WireDType, connect_teacher


# ---------------------------------------------------------------------------- shared pieces
class TeacherLink:
    """Connect a module to its black-box teacher lazily (at fit start), so that loading a checkpoint needs no teacher.

    The journal defaults to ``<trainer.default_root_dir>/queries/journal.bin`` so a resumed run finds it; the
    query statistics are written to ``queries/stats.json`` next to it at the end of every epoch.
    """

    def __init__(self, module: BaseTask) -> None:
        self.module = module
        self.client: QueryClient | None = None
        self.spent_before = 0

    def connect(self, num_classes: int | None) -> QueryClient:
        hp = self.module.hparams
        root = Path(self.module.trainer.default_root_dir if self.module._trainer is not None else ".")
        journal = hp.journal if hp.journal is not None else root / "queries" / "journal.bin"
        budget, self.spent_before = hp.query_budget, 0
        if budget is not None and hp.get("spent_before"):
            from kd_lightning.data.query import spent_queries

            spent = spent_queries(hp.spent_before)
            if spent >= budget:
                raise ConfigError(
                    f"query_budget={budget} but the earlier stages {list(hp.spent_before)} already spent {spent}"
                )
            budget, self.spent_before = budget - spent, spent
        kwargs: dict[str, Any] = dict(
            responses=hp.responses,
            query_budget=budget,
            journal=None if str(journal) == "" else journal,
            wire_dtype=hp.wire_dtype,
        )
        if str(hp.teacher).startswith(("http://", "https://")):
            kwargs.update(token=hp.token, timeout=hp.timeout)
        client = connect_teacher(hp.teacher, **kwargs)
        client._ensure_open()
        if num_classes is not None and client.num_classes and client.num_classes != num_classes:
            raise ConfigError(
                f"the teacher at {hp.teacher} answers {client.num_classes} classes but the model has "
                f"num_classes={num_classes}"
            )
        self.client = client
        self.stats_path = root / "queries" / "stats.json"
        return client

    def write_stats(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.client is None:
            return {}
        self.client._sync_journal_stats()
        stats = {**self.client.stats.as_dict(), "query_budget": self.client.query_budget, **(extra or {})}
        if self.spent_before:
            stats["spent_before"] = self.spent_before  # paid by earlier stages (spent_before), not in journal_*
        atomic_write_bytes(self.stats_path, json.dumps(stats, indent=2).encode())
        return stats

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def answer_logits(answers: torch.Tensor, responses: Responses, num_classes: int) -> torch.Tensor:
    """Teacher answers as logits: centred ``log p`` (soft) or one-hot vectors (hard)."""
    if responses == "soft":
        logp = answers.float().clamp_min(1e-12).log()
        return logp - logp.mean(-1, keepdim=True)
    return F.one_hot(answers.long(), num_classes).float()


def _check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}; expected one of {', '.join(repr(a) for a in allowed)}")


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
        nets: ``"dcgan"`` (:class:`~kd_lightning.gans.DCGANGenerator`, issue 7's nets) or ``"official"``
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
        _check_choice("responses", responses, ("soft", "hard"))
        _check_choice("nets", nets, ("dcgan", "official"))
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
        self.link = TeacherLink(self)

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
        client._sync_journal_stats()
        spent = int(client.stats.as_dict().get("journal_spent", 0))
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
        self.link.write_stats({"stage": "deprivatization"})
        self.link.close()

    # ``kdl test`` on a deprivatization checkpoint runs the generator gate (callbacks/generator_gate.py): the
    # test loop itself does nothing but give the callback its place, with the teacher connected.
    def on_test_start(self) -> None:
        self.link.connect(self.hparams.num_classes)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        return None

    def on_test_end(self) -> None:
        self.link.write_stats({"stage": "deprivatization"})
        self.link.close()

    def on_train_epoch_end(self) -> None:
        stats = self.link.write_stats({"stage": "deprivatization"})
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


class FrozenGenerator(nn.Module):
    """A trained generator, frozen and always in eval mode; gradients still flow to its input."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.g = generator
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenGenerator:
        return super().train(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.g(z)


def load_frozen_generator(path: str, ema: bool = True) -> FrozenGenerator:
    """The (EMA) generator of a :class:`MEKDDeprivatization` or :class:`~kd_lightning.methods.DCGAN` checkpoint, frozen.

    Rebuilt from the checkpoint's hyper-parameters alone (the teacher is not contacted).
    """
    from kd_lightning.checkpoints import load_checkpoint
    from kd_lightning.errors import CheckpointError
    from kd_lightning.gans import DCGANGenerator

    ckpt = load_checkpoint(path)
    hp, state = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
    prefix = "generator_ema." if ema else "generator."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights or "z_dim" not in hp:
        raise CheckpointError(
            f"checkpoint {path!r} holds no {prefix.rstrip('.')} weights: it was not written by MEKDDeprivatization "
            "or DCGAN"
        )
    if hp.get("nets") == "official":
        g: Generator = MEKDGenerator(hp["z_dim"], hp["image_size"], hp["in_channels"], hp.get("official_width", 1.0))
    else:
        g = DCGANGenerator(hp["z_dim"], hp["image_size"], hp["in_channels"], hp.get("g_ch", 64))
    g.load_state_dict(weights)
    return FrozenGenerator(g)


# ---------------------------------------------------------------------------- black-box student template
class BlackBoxStudent(NetTask):
    """A student trained from a black-box teacher's answers on query images; evaluated on labelled val/test.

    Subclasses give the query images of a training batch (:meth:`query_images`) and the loss (:meth:`distill_loss`).
    Batches come from :class:`~kd_lightning.data.QueryPoolDataModule` and carry no labels.

    Args:
        teacher: a ``kdl serve-teacher`` URL or a classifier checkpoint answered in-process.
        responses: ``"soft"`` or ``"hard"``.
        query_budget: most images the run may send (journalled restarts included); ``None``: unlimited.
        journal: query journal path (``None``: ``<default_root_dir>/queries/journal.bin``; ``""``: none).
        token: bearer token for a URL teacher (``None``: env ``KDL_TEACHER_TOKEN``).
        timeout: seconds per HTTP request.
        wire_dtype: how images travel.
        generator: a deprivatization checkpoint: the query images are then G(z) for the latent pool's z (the
            generator frozen) instead of local images.
        ema_generator: use that checkpoint's EMA generator (else the raw one).
        spent_before: earlier stages whose paid queries count against ``query_budget`` (run folders, or their
            ``queries/stats.json``): MEKD's stage 2 names stage 1, so ``query_budget`` is the whole method's.
        **kwargs: see :class:`~kd_lightning.methods.supervised.NetTask` (``net`` is the student).
    """

    task = "classification"
    monitor, monitor_mode = "val/acc1", "max"

    def __init__(
        self,
        teacher: str,
        responses: Responses = "soft",
        query_budget: int | None = None,
        journal: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        wire_dtype: WireDType = "uint8",
        generator: str | None = None,
        ema_generator: bool = True,
        spent_before: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_choice("responses", responses, ("soft", "hard"))
        self._pending = (None if generator is None else load_frozen_generator(generator, ema_generator),)
        super().__init__(**kwargs)
        self.link = TeacherLink(self)

    def configure_models(self) -> None:
        super().configure_models()
        generator = self._pending[0]  # registered here so that the checkpoint holds it (and loads strictly)
        del self._pending
        if generator is not None:
            self.generator = generator
            z_dim = generator.g.z_dim
            if z_dim != self.hparams.num_classes:
                raise ConfigError(
                    f"the generator in {self.hparams.generator!r} takes z_dim={z_dim} but {type(self).__name__} "
                    f"needs z_dim = num_classes={self.hparams.num_classes}; train it with z_dim = num_classes"
                )

    @property
    def pool(self) -> str:
        """The query pool this student needs: latent codes with a generator, else local images."""
        return "latent" if self.hparams.get("generator") else "local"

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss()  # evaluation only

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes
        self.val_metrics = classification_metrics(n).clone(prefix="val/")
        self.test_metrics = classification_metrics(n).clone(prefix="test/")

    def check_data(self, dm: L.LightningDataModule) -> None:
        super().check_data(dm)
        given = getattr(dm, "pool", None)
        if given not in (None, self.pool):
            raise ConfigError(f"{type(self).__name__} queries pool={self.pool!r} but the data gives pool={given!r}")

    # ------------------------------------------------------------------ hooks
    def query_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Images in [0, 1] to query for this batch: G(z) with a generator, else the local images."""
        if self.hparams.get("generator"):
            with torch.no_grad():
                return ((self.generator(batch["z"].to(self.device)) + 1) / 2).clamp(0, 1)
        return batch["image"]

    def distill_loss(self, x: torch.Tensor, student: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ loop
    def on_fit_start(self) -> None:
        self.link.connect(self.hparams.num_classes)

    def on_train_epoch_end(self) -> None:
        stats = self.link.write_stats({"method": type(self).__name__})
        if stats:
            self.log_dict({f"queries/{k}": float(stats[k]) for k in ("journal_spent", "journal_bytes_up")})

    def on_fit_end(self) -> None:
        self.link.write_stats({"method": type(self).__name__})
        self.link.close()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        client = self.link.client
        if client is None:
            raise RuntimeError(f"{type(self).__name__}: the teacher is not connected (on_fit_start has not run)")
        x = client.prepare(self.query_images(batch).detach())
        answers = client.query(x)
        parts = self.distill_loss(x, self(x), answers)
        loss = cast(torch.Tensor, sum(parts.values()))  # distill_loss gives at least one part
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self(batch["image"])
        self.log(f"{stage}/loss", self.criterion(logits, batch["label"]), on_step=False, on_epoch=True)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), batch["label"])
        self.log_metrics(stage, metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")


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
        _check_choice("norm", norm, (1, 2))
        _check_choice("lf_reduction", lf_reduction, ("sample_norm", "mean"))
        _check_choice("kl_scale", kl_scale, ("tau", "tau2", "none"))
        _check_choice("generator_input", generator_input, ("logits", "softmax"))
        if hard_scale <= 0:
            raise ConfigError(f"hard_scale={hard_scale}; expected a number > 0 (1: the official one-hot)")
        super().__init__(generator=generator, **kwargs)

    def _gen_input(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits / self.hparams.tau
        return F.softmax(z, -1) if self.hparams.generator_input == "softmax" else z

    def distill_loss(self, x: torch.Tensor, student: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        t = answer_logits(answers, hp.responses, hp.num_classes).to(student.device)
        if hp.responses == "hard":
            t = t * hp.hard_scale
        s = student - student.mean(-1, keepdim=True) if hp.responses == "soft" else student
        with torch.no_grad():
            g_t = self.generator(self._gen_input(t))
        diff = (self.generator(self._gen_input(s)) - g_t).flatten(1)
        if hp.lf_reduction == "mean":
            lf = diff.abs().mean() if hp.norm == 1 else diff.pow(2).mean()
        else:
            lf = diff.norm(p=hp.norm, dim=1).mean()
        scale = {"tau": hp.tau, "tau2": hp.tau**2, "none": 1.0}[hp.kl_scale]
        kl = F.kl_div(F.log_softmax(s / hp.tau, -1), F.softmax(t / hp.tau, -1), reduction="batchmean") * scale
        return {"lf": hp.lf_weight * lf, "kl": hp.beta * kl}


# ---------------------------------------------------------------------------- baselines
class BlackBoxKD(BlackBoxStudent):
    """Baselines on queried local images, same budget and framework as :class:`MEKD`.

    ``method``:

    - ``"kd"`` — soft answers: Hinton's KD (:class:`~kd_lightning.losses.BLKD` at temperature ``T`` on the centred
      ``log p``); hard answers: cross-entropy on the teacher's class (hard-label KD);
    - ``"ml"`` — Ba & Caruana: mean squared error between the student's and the teacher's centred logits (soft only);
    - ``"dkd"`` — :class:`~kd_lightning.losses.DKD` with the teacher's class as the target (soft only; no ground truth).

    Args:
        method: ``"kd"``, ``"ml"`` or ``"dkd"``.
        T: temperature of KD/DKD.
        dkd_alpha: DKD's TCKD weight.
        dkd_beta: DKD's NCKD weight.
        dkd_warmup_epochs: DKD's linear ramp.
        **kwargs: see :class:`BlackBoxStudent`.
    """

    def __init__(
        self,
        method: Literal["kd", "ml", "dkd"] = "kd",
        T: float = 4.0,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        dkd_warmup_epochs: int = 20,
        **kwargs: Any,
    ) -> None:
        _check_choice("method", method, ("kd", "ml", "dkd"))
        if method != "kd" and kwargs.get("responses", "soft") == "hard":
            raise ConfigError(f"method={method!r} needs soft answers (probabilities); with hard answers use 'kd'")
        super().__init__(**kwargs)

    def configure_losses(self) -> None:
        super().configure_losses()
        hp = self.hparams
        self.blkd = BLKD(T=hp.T, weight=1.0)
        self.dkd = DKD(alpha=hp.dkd_alpha, beta=hp.dkd_beta, T=hp.T, warmup_epochs=hp.dkd_warmup_epochs)

    def distill_loss(self, x: torch.Tensor, student: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        if hp.responses == "hard":
            return {"ce": F.cross_entropy(student, answers.long().to(student.device))}
        t = answer_logits(answers, "soft", hp.num_classes).to(student.device)
        if hp.method == "kd":
            return {"kd": self.blkd(Outputs(student), Outputs(t), {})}
        if hp.method == "ml":
            return {"ml": F.mse_loss(student - student.mean(-1, keepdim=True), t)}
        from kd_lightning.losses.base import StepContext

        ctx = StepContext(self, self, epoch=self.current_epoch)
        return {"dkd": self.dkd(Outputs(student), Outputs(t), {"label": t.argmax(-1)}, ctx)}


__all__ = ["MEKD", "BlackBoxKD", "BlackBoxStudent", "FrozenGenerator", "MEKDDeprivatization", "answer_logits"]
