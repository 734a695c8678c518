"""The methods MEKD's Table 1 compares with, on the black-box teacher protocol of :class:`~kd_lightning.methods.MEKD`.

Every one is a :class:`~kd_lightning.methods.mekd.BlackBoxStudent` (or, DAFL, a white-box sibling) trained by
``kdl fit`` on a :class:`~kd_lightning.data.QueryPoolDataModule`; every image sent to the teacher goes through its
:class:`~kd_lightning.teachers.blackbox.QueryClient`, so it is counted, journalled, paid once (a resumed run reads
its answers from the journal) and refused past ``query_budget``. ``queries/spent`` is logged at every validation,
beside ``val/acc1``, so accuracy against queries can be read from the run's metrics.

- :class:`KN` — Knockoff Nets (Orekondy et al. 2019), random policy: a transfer set of local images drawn at
  random, queried up front, then KD on it.
- :class:`AL` — adversarial learning (Wang et al. 2018): KD plus a discriminator on logits.
- :class:`DAFL` — data-free learning (Chen et al. 2019): a generator driven by the teacher's outputs *and
  features*; white-box, as in MEKD's table (it needs the teacher's gradients).
- :class:`AM` — Active Mixup (Wang et al. 2020): rounds of mixed image pairs chosen by the student's uncertainty.
- :class:`DB3KD` — decision-based black-box KD (Wang 2021): soft labels from distances to the teacher's decision
  boundaries, found with hard answers only; hundreds of queries per sample.

docs/mekd.md lists, per method, what it queries and each difference from the MEKD code's baseline script.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.blackbox import (
    KLScale,
    boundary_kl,
    boundary_soft_labels,
    dafl_losses,
    discriminator_loss,
    fool_loss,
    soft_cross_entropy,
    tempered_kl,
)
from kd_lightning.methods.mekd import BlackBoxStudent, answer_logits
from kd_lightning.teachers.blackbox import QueryBudgetExceeded, QueryClient


def _need(responses: str, want: str, method: str) -> None:
    if responses != want:
        why = "probabilities" if want == "soft" else "only the teacher's decisions (class ids)"
        raise ConfigError(f"{method} needs {want} answers ({why}); got responses={responses!r}: set responses: {want}")


def default_discriminator_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """AL's discriminator optimiser in MEKD's code: Adam, lr 0.01."""
    return torch.optim.Adam(params, lr=1e-2)


def default_generator_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """DAFL's generator optimiser in the DAFL and MEKD code: Adam, lr 0.2."""
    return torch.optim.Adam(params, lr=0.2)


def _with(student: Any, other: torch.optim.Optimizer) -> Any:  # noqa: ANN401 - Lightning's optimiser union
    """The student's optimiser (and scheduler) from :meth:`BaseTask.configure_optimizers`, plus a second optimiser."""
    if isinstance(student, dict):
        return [student["optimizer"], other], [student["lr_scheduler"]["scheduler"]]
    return [student, other]


class _Baseline(BlackBoxStudent):
    """Shared: the client of a connected run, the pool dataset, and ``queries/spent`` at every validation."""

    @property
    def client(self) -> QueryClient:
        if self.link.client is None:
            raise RuntimeError(f"{type(self).__name__}: the teacher is not connected (on_fit_start has not run)")
        return self.link.client

    def pool_dataset(self) -> Any:  # noqa: ANN401 - a map-style dataset with a length
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_dataset", None)
        if ds is None:
            raise ConfigError(f"{type(self).__name__} reads its local images from a QueryPoolDataModule (pool: local)")
        return ds

    def pool_images(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        ds = self.pool_dataset()
        return torch.stack([ds[int(i)]["image"] for i in index]).to(self.device)

    def on_validation_epoch_end(self) -> None:
        if self.link.client is not None:
            self.log("queries/spent", float(self.link.client.spent))


# ---------------------------------------------------------------------------- KN
class KN(_Baseline):
    """Knockoff Nets (Orekondy et al., CVPR 2019), random policy, as MEKD's ``KN.py`` runs it.

    Transfer-set construction: ``transfer_size`` items of the local pool drawn at random (seeded, no replacement)
    are queried up front at fit start, in requests of ``build_batch`` images; then the student learns
    ``tau-scaled KL(softmax(t / T) || softmax(s / T))`` on the transfer set only, each image seen under a fresh
    random crop (``augment``) while its answer stays the one paid for. The adaptive (bandit) policy of the paper is
    not implemented. Soft answers only.

    Args:
        transfer_size: images in the transfer set (``None``: the whole pool); must fit in ``query_budget``.
        policy_seed: seed of the random policy.
        T: temperature (MEKD code: 5).
        kl_scale: factor of the KL: ``"tau"`` (MEKD code), ``"tau2"`` or ``"none"``.
        augment: random crops (padding 1/8 of the side) of the transfer images during training.
        build_batch: images per request while building the transfer set.
        **kwargs: see :class:`~kd_lightning.methods.mekd.BlackBoxStudent`.
    """

    def __init__(
        self,
        transfer_size: int | None = None,
        policy_seed: int = 0,
        T: float = 5.0,
        kl_scale: KLScale = "tau",
        augment: bool = True,
        build_batch: int = 256,
        **kwargs: Any,
    ) -> None:
        _need(kwargs.get("responses", "soft"), "soft", "KN")
        if (transfer_size is not None and transfer_size < 1) or T <= 0 or build_batch < 1:
            raise ConfigError(
                f"transfer_size={transfer_size}, T={T}, build_batch={build_batch}; expected >= 1 (or null), > 0, >= 1"
            )
        super().__init__(**kwargs)
        self.transfer: torch.Tensor | None = None  # N x C answers (NaN outside the transfer set), rebuilt each fit

    def transfer_indices(self, n: int) -> torch.Tensor:
        """The random policy: ``transfer_size`` of ``n`` pool items, sorted."""
        size = self.hparams.transfer_size or n
        if size > n:
            raise ConfigError(f"KN: transfer_size={size} but the pool holds {n} images")
        g = torch.Generator().manual_seed(self.hparams.policy_seed)
        return torch.randperm(n, generator=g)[:size].sort().values

    def on_fit_start(self) -> None:
        super().on_fit_start()
        n = len(self.pool_dataset())
        chosen = self.transfer_indices(n)
        budget = self.client.query_budget
        if budget is not None and len(chosen) > budget:
            raise QueryBudgetExceeded(
                f"KN: a transfer set of {len(chosen)} images exceeds query_budget={budget}; "
                "lower transfer_size or raise the budget"
            )
        answers = torch.full((n, int(self.hparams.num_classes)), float("nan"))
        for part in chosen.split(self.hparams.build_batch):
            x = self.client.prepare(self.pool_images(part))
            answers[part] = self.client.query(x).float().cpu()
        self.transfer = answers

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        assert self.transfer is not None
        index = batch["index"].cpu()
        keep = ~self.transfer[index, 0].isnan()
        if not keep.any():
            return None  # no transfer image in this batch
        x = self.client.prepare(batch["image"][keep.to(batch["image"].device)])
        if self.hparams.augment:
            x = random_crop(x)
        t = answer_logits(self.transfer[index[keep]], "soft", self.hparams.num_classes).to(x.device)
        loss = tempered_kl(self(x), t, self.hparams.T, self.hparams.kl_scale)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/kl", loss.detach(), on_step=True, on_epoch=True)
        return loss


def random_crop(x: torch.Tensor) -> torch.Tensor:
    """Each image cropped at a random offset from a zero padding of 1/8 of its side (same size out)."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * pad + 1, (len(x), 2)).tolist()):
        out[i] = padded[i, :, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    return out


# ---------------------------------------------------------------------------- AL
class LogitDiscriminator(nn.Module):
    """AL's discriminator on C logits: Linear(C, 512)-LReLU-Linear(512, 256)-LReLU-Linear(256, 1), raw scores."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_classes, 512), nn.LeakyReLU(0.2), nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1)
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits).squeeze(-1)


class AL(_Baseline):
    """Adversarial learning of portable students (Wang et al., AAAI 2018) against the black box, as MEKD's ``AL.py``.

    On each batch of queried local images: ``w_kl * T KL(softmax(t / T) || softmax(s / T)) + w_adv * L_adv``,
    with a discriminator D on logits telling the teacher's (centred ``log p``) from the student's (centred logits).
    ``adversarial``:

    - ``"official"`` (MEKD code): student and D minimise the same ``L_adv = BCE(D(t), 1) + BCE(D(s), 0)``, D's
      gradient scaled by ``w_adv`` as in the code's single backward pass;
    - ``"minimax"`` (the AL paper's game): D minimises ``BCE(D(t), 1) + BCE(D(s), 0)`` on detached logits, the
      student ``BCE(D(s), 1)``.

    Soft answers only. Manual optimisation: the student's optimiser/scheduler from the recipe, D's from
    ``discriminator_optimizer`` (MEKD code: Adam, lr 0.01).

    Args:
        T: temperature (MEKD code: 2).
        w_kl: weight of the KL (MEKD code: 0.5).
        w_adv: weight of the adversarial loss (MEKD code: 0.15).
        adversarial: ``"official"`` or ``"minimax"``.
        discriminator_optimizer: builds D's optimiser.
        **kwargs: see :class:`~kd_lightning.methods.mekd.BlackBoxStudent`.
    """

    hparams_ignore = (*BlackBoxStudent.hparams_ignore, "discriminator_optimizer")

    def __init__(
        self,
        T: float = 2.0,
        w_kl: float = 0.5,
        w_adv: float = 0.15,
        adversarial: Literal["official", "minimax"] = "official",
        discriminator_optimizer: OptimizerCallable = default_discriminator_optimizer,
        **kwargs: Any,
    ) -> None:
        _need(kwargs.get("responses", "soft"), "soft", "AL")
        if adversarial not in ("official", "minimax"):
            raise ConfigError(f"adversarial={adversarial!r}; expected 'official' or 'minimax'")
        if T <= 0 or w_kl < 0 or w_adv < 0:
            raise ConfigError(f"T={T}, w_kl={w_kl}, w_adv={w_adv}; expected T > 0 and weights >= 0")
        self.discriminator_factory = discriminator_optimizer
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def configure_models(self) -> None:
        super().configure_models()
        self.discriminator = LogitDiscriminator(int(self.hparams.num_classes))

    def trainable_parameters(self) -> Iterator[torch.Tensor]:
        ids = {id(p) for p in self.discriminator.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in ids)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        student = super().configure_optimizers()
        d_opt = self.discriminator_factory(self.discriminator.parameters())
        return _with(student, d_opt)

    def al_parts(self, s: torch.Tensor, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the student's loss parts, D's loss) for centred student logits ``s`` and teacher logits ``t``."""
        hp = self.hparams
        kl = tempered_kl(s, t, hp.T, "tau")
        if hp.adversarial == "official":
            adv = discriminator_loss(self.discriminator(t), self.discriminator(s))
            return {"kl": hp.w_kl * kl, "adv": hp.w_adv * adv}, hp.w_adv * adv
        d = discriminator_loss(self.discriminator(t), self.discriminator(s.detach()))
        return {"kl": hp.w_kl * kl, "adv": hp.w_adv * fool_loss(self.discriminator(s))}, d

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        s_opt, d_opt = cast(list, self.optimizers())
        x = self.client.prepare(batch["image"].detach())
        t = answer_logits(self.client.query(x), "soft", self.hparams.num_classes).to(x.device)
        student = self(x)
        s = student - student.mean(-1, keepdim=True)
        parts, d_loss = self.al_parts(s, t)
        loss = parts["kl"] + parts["adv"]
        s_opt.zero_grad()
        d_opt.zero_grad()
        if self.hparams.adversarial == "official":  # one backward, both step (the code's shared objective)
            self.manual_backward(loss)
        else:
            self.manual_backward(d_loss, inputs=list(self.discriminator.parameters()))
            self.manual_backward(loss, inputs=list(self.trainable_parameters()))
        s_opt.step()
        d_opt.step()
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=True)
        self.log("train/discriminator", d_loss.detach(), on_step=True, on_epoch=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        sched = self.lr_schedulers()
        if sched is not None:
            for s in sched if isinstance(sched, list) else [sched]:
                s.step()  # type: ignore[call-arg]


# ---------------------------------------------------------------------------- DAFL
class DAFL(BlackBoxStudent):
    """Data-free learning of student networks (Chen et al., ICCV 2019): WHITE-BOX, as in MEKD's table.

    DAFL trains its generator through the teacher's gradients and penultimate features, which no black box gives;
    MEKD's table runs it white-box ("0K" data), and so does this class: ``teacher`` must be a checkpoint (loaded as
    a frozen white-box net), never a URL. A generator (:class:`~kd_lightning.gans.dafl.DAFLGenerator`) makes
    images in the teacher's normalised space from fresh z ~ N(0, I) each step; it minimises
    ``oh * L_oh + ie * L_ie + a * L_a`` (:func:`~kd_lightning.losses.blackbox.dafl_losses`) while the student learns
    ``KL(softmax(t) || softmax(s))`` on the detached images. No real image is used for training (the pool only sets
    the number of steps and the batch size: use ``pool: latent``). The images shown to the teacher are counted and
    held to ``query_budget`` like queries (logged as ``queries/spent``); there is no journal (nothing is paid to an
    API and the images change every step).

    Args:
        teacher: the teacher's classifier checkpoint (white-box).
        z_dim: latent size (DAFL: 100).
        oh: weight of the one-hot loss (1).
        ie: weight of the information-entropy loss (MEKD code: 5).
        a: weight of the activation loss (0.1).
        generator_optimizer: builds the generator's optimiser (MEKD code: Adam, lr 0.2).
        **kwargs: see :class:`~kd_lightning.methods.mekd.BlackBoxStudent` (the student's optimiser: MEKD code, Adam
            lr 2e-3 on MNIST, SGD lr 0.1 otherwise; ``responses`` is ignored).
    """

    pool = "latent"
    hparams_ignore = (*BlackBoxStudent.hparams_ignore, "generator_optimizer")

    def __init__(
        self,
        teacher: str,
        z_dim: int = 100,
        oh: float = 1.0,
        ie: float = 5.0,
        a: float = 0.1,
        generator_optimizer: OptimizerCallable = default_generator_optimizer,
        **kwargs: Any,
    ) -> None:
        if str(teacher).startswith(("http://", "https://")):
            raise ConfigError(
                f"DAFL is white-box (it back-propagates through the teacher and reads its features): "
                f"teacher={teacher!r} must be the teacher's checkpoint, not a URL"
            )
        if z_dim < 1 or min(oh, ie, a) < 0:
            raise ConfigError(f"z_dim={z_dim}, oh={oh}, ie={ie}, a={a}; expected z_dim >= 1 and weights >= 0")
        self.generator_factory = generator_optimizer
        super().__init__(teacher=teacher, **kwargs)
        self.automatic_optimization = False
        self.shown = 0  # images shown to the teacher in this process

    def configure_models(self) -> None:
        super().configure_models()
        from kd_lightning.gans.dafl import DAFLGenerator
        from kd_lightning.teachers.frozen import FrozenTeacher

        hp = self.hparams
        self.white_teacher = FrozenTeacher.from_checkpoint(hp.teacher)
        self.white_teacher.check_compatible("classification", hp.num_classes, hp.in_channels, "the student")
        self.generator = DAFLGenerator(hp.z_dim, hp.image_size, hp.in_channels)

    def trainable_parameters(self) -> Iterator[torch.Tensor]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        student = super().configure_optimizers()
        g_opt = self.generator_factory(self.generator.parameters())
        return _with(student, g_opt)

    def on_fit_start(self) -> None:  # no black-box client: the teacher is white-box
        from kd_lightning.nets import FeatureExtractor

        self._features = FeatureExtractor(self.white_teacher.net, ["penultimate"])

    def on_fit_end(self) -> None:
        self._features.close()

    def on_train_epoch_end(self) -> None:
        sched = self.lr_schedulers()
        if sched is not None:
            for s in sched if isinstance(sched, list) else [sched]:
                s.step()  # type: ignore[call-arg]

    def on_validation_epoch_end(self) -> None:
        self.log("queries/spent", float(self.shown))

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        """Generator output (the teacher's normalised space) as the [0, 1]-scale images our nets normalise."""
        norm = self.white_teacher.normalize
        return x * norm.std.view(1, -1, 1, 1) + norm.mean.view(1, -1, 1, 1)

    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits and penultimate features, with gradients flowing back to ``images``."""
        out, feats = self._features(self.white_teacher.normalize(images))
        return out, feats["penultimate"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        n = len(batch["z"])
        if hp.query_budget is not None and self.shown + n > hp.query_budget:
            raise QueryBudgetExceeded(
                f"DAFL: showing {n} more images to the teacher would exceed query_budget={hp.query_budget} "
                f"({self.shown} shown)"
            )
        s_opt, g_opt = cast(list, self.optimizers())
        images = self.to_unit_range(self.generator(torch.randn(n, hp.z_dim, device=self.device)))
        logits, feats = self.teacher_outputs(images)
        self.shown += n
        parts = dafl_losses(logits, feats)
        g_loss = hp.oh * parts["one_hot"] + hp.ie * parts["entropy"] + hp.a * parts["activation"]
        kd = tempered_kl(self(images.detach()), logits.detach(), 1.0, "none")
        s_opt.zero_grad()
        g_opt.zero_grad()
        self.manual_backward(g_loss + kd)  # separable: kd reaches only the student, g_loss only the generator
        g_opt.step()
        s_opt.step()
        self.log("train/loss", kd.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=True)
        return kd.detach()


# ---------------------------------------------------------------------------- AM
class AM(_Baseline):
    """Active Mixup (Wang et al., CVPR 2020), the "AM" of MEKD's table, as MEKD's ``AM.py`` runs it.

    Round 0 queries the pool's local images (soft) and trains the student on ``-sum p log softmax(s)``. At the
    start of each later round (epoch boundaries from ``round_epochs``) the current student scores candidate pairs
    ``(i, i - k)`` of pool images (k = 1, 2, ..., at most ``candidate_pairs`` pairs not chosen before) at mixing
    weights w in ``0.30, 0.34, ..., 0.70``; each pair keeps the w where the student's top probability is lowest, and
    the ``mix_per_round`` most uncertain mixes ``w a + (1 - w) b`` are queried and join the training set. Each
    training step adds to the pool batch a random batch of the mixed images chosen so far, in proportion to their
    number. Queries: the pool, plus ``mix_per_round`` per round. The chosen pairs, weights and answers are
    checkpointed.

    Args:
        round_epochs: epochs of each round (MEKD code: 80, 60, 40, 20 -> 3 mix-up rounds).
        mix_per_round: mixed images queried per round (MEKD code: 10,000).
        candidate_pairs: pairs scored per round (MEKD code: 500,000).
        score_batch: images per student forward while scoring.
        **kwargs: see :class:`~kd_lightning.methods.mekd.BlackBoxStudent`.
    """

    WEIGHTS = torch.arange(0.30, 0.70 + 1e-6, 0.04)
    ROUNDS = (80, 60, 40, 20)

    def __init__(
        self,
        round_epochs: list[int] | None = None,
        mix_per_round: int = 10_000,
        candidate_pairs: int = 500_000,
        score_batch: int = 1024,
        **kwargs: Any,
    ) -> None:
        _need(kwargs.get("responses", "soft"), "soft", "AM")
        rounds = list(round_epochs or self.ROUNDS)
        if not rounds or min(rounds) < 1 or mix_per_round < 1 or candidate_pairs < 1 or score_batch < 1:
            raise ConfigError(
                f"round_epochs={rounds}, mix_per_round={mix_per_round}, candidate_pairs={candidate_pairs}, "
                f"score_batch={score_batch}; expected positive numbers"
            )
        super().__init__(**kwargs)
        self.mix_pairs = torch.zeros(0, 2, dtype=torch.long)
        self.mix_weights = torch.zeros(0)
        self.mix_answers = torch.zeros(0, int(self.hparams.num_classes or 0))
        self.rounds_done = 0

    def round_starts(self) -> list[int]:
        """Epochs at which mix-up rounds 1, 2, ... begin."""
        starts, total = [], 0
        for e in list(self.hparams.round_epochs or self.ROUNDS)[:-1]:
            total += e
            starts.append(total)
        return starts

    def on_fit_start(self) -> None:
        super().on_fit_start()
        budget = self.client.query_budget
        need = len(self.pool_dataset()) + len(self.round_starts()) * self.hparams.mix_per_round
        if budget is not None and need > budget:
            raise ConfigError(
                f"AM: {len(self.pool_dataset())} pool images + {len(self.round_starts())} rounds x "
                f"mix_per_round={self.hparams.mix_per_round} = {need} queries exceed query_budget={budget}"
            )

    def on_train_epoch_start(self) -> None:
        starts = self.round_starts()
        while self.rounds_done < len(starts) and self.current_epoch >= starts[self.rounds_done]:
            self.select_mixes()
            self.rounds_done += 1

    def candidates(self, n: int) -> torch.Tensor:
        """Up to ``candidate_pairs`` pairs (i, i - k mod n), k = 1, 2, ..., not already chosen."""
        chosen = {tuple(p) for p in self.mix_pairs.tolist()}
        out: list[tuple[int, int]] = []
        for k in range(1, n):
            for i in range(n):
                pair = (i, (i - k) % n)
                if pair not in chosen:
                    out.append(pair)
                    if len(out) == self.hparams.candidate_pairs:
                        return torch.tensor(out)
        return torch.tensor(out, dtype=torch.long).view(-1, 2)

    @torch.no_grad()
    def score(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair: the weight whose mix the student is least sure of, and that top probability."""
        w = self.WEIGHTS.to(a.device)
        mixes = w.view(-1, 1, 1, 1, 1) * a + (1 - w.view(-1, 1, 1, 1, 1)) * b  # W x N x C x H x W
        top = torch.stack([F.softmax(self(m), -1).max(-1).values for m in mixes])  # W x N
        best = top.argmin(0)
        return w[best], top.gather(0, best.view(1, -1)).squeeze(0)

    def mix(self, pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        a, b = self.pool_images(pairs[:, 0]), self.pool_images(pairs[:, 1])
        w = weights.to(a.device).view(-1, 1, 1, 1)
        return self.client.prepare(w * a + (1 - w) * b)

    def select_mixes(self) -> None:
        hp = self.hparams
        pairs = self.candidates(len(self.pool_dataset()))
        if not len(pairs):
            return
        was = self.net.training
        self.net.eval()
        ws, tops = [], []
        for part in pairs.split(hp.score_batch):
            w, top = self.score(self.pool_images(part[:, 0]), self.pool_images(part[:, 1]))
            ws.append(w.cpu())
            tops.append(top.cpu())
        self.net.train(was)
        order = torch.cat(tops).argsort()[: hp.mix_per_round]
        new_pairs, new_w = pairs[order], torch.cat(ws)[order]
        answers = torch.cat([self.client.query(self.mix(p, w)).float().cpu() for p, w in
                             zip(new_pairs.split(256), new_w.split(256))])  # fmt: skip
        self.mix_pairs = torch.cat([self.mix_pairs, new_pairs])
        self.mix_weights = torch.cat([self.mix_weights, new_w])
        self.mix_answers = torch.cat([self.mix_answers.view(-1, answers.shape[1]), answers])
        self.log("am/mixed_images", float(len(self.mix_pairs)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self.client.prepare(batch["image"].detach())
        p = self.client.query(x).float()
        m = len(self.mix_pairs)
        if m:
            k = max(1, round(len(x) * m / len(self.pool_dataset())))
            pick = torch.randint(0, m, (k,))
            x = torch.cat([x, self.mix(self.mix_pairs[pick], self.mix_weights[pick])])
            p = torch.cat([p, self.mix_answers[pick].to(p.device)])
        loss = soft_cross_entropy(self(x), p.to(x.device))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["active_mixup"] = {
            "pairs": self.mix_pairs,
            "weights": self.mix_weights,
            "answers": self.mix_answers,
            "rounds_done": self.rounds_done,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("active_mixup")
        if state is not None:
            self.mix_pairs, self.mix_weights = state["pairs"], state["weights"]
            self.mix_answers, self.rounds_done = state["answers"], int(state["rounds_done"])


# ---------------------------------------------------------------------------- DB3KD
class DB3KD(_Baseline):
    """Decision-based black-box KD (Wang, ICML 2021) as MEKD's ``DB3KD.py`` runs it (``mode='bd'``): hard answers only.

    At fit start every pool image is queried once for the teacher's class. The first time a pool image x0 (class
    c) comes up in training, for every other class t it takes ``n_starts`` pool images of class t (seeded per
    image) and bisects ``search_steps`` times along each line x0 -> x_t for the point where the teacher's answer
    turns to t; ``d_t`` is the shortest distance found. Its soft label is ``1 / d_t`` for t != c and their sum
    for c (:func:`~kd_lightning.losses.blackbox.boundary_soft_labels`); the student learns
    ``KL(softmax(label) || softmax(s / T))``. Cost per image: up to ``(C - 1) * n_starts * search_steps``
    queries (repeated probes are free): ``queries/spent`` is logged at each validation beside ``val/acc1``.

    When the next batch's labels would not fit the budget, ``on_budget: stop`` labels only as many images as fit
    and trains on the labelled ones from then on; ``raise`` ends the run with the budget error.

    Args:
        n_starts: images of each other class to search from (MEKD code: 11).
        search_steps: bisection steps per line (MEKD code: until the step is below 1e-5).
        T: temperature on the student's logits (MEKD code: 20).
        on_budget: ``"stop"`` or ``"raise"``.
        search_seed: seed of the choice of starting images.
        **kwargs: see :class:`~kd_lightning.methods.mekd.BlackBoxStudent`.
    """

    def __init__(
        self,
        n_starts: int = 11,
        search_steps: int = 17,
        T: float = 20.0,
        on_budget: Literal["stop", "raise"] = "stop",
        search_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        _need(kwargs.get("responses", "soft"), "hard", "DB3KD")
        if n_starts < 1 or search_steps < 1 or T <= 0 or on_budget not in ("stop", "raise"):
            raise ConfigError(
                f"n_starts={n_starts}, search_steps={search_steps}, T={T}, on_budget={on_budget!r}; expected "
                "n_starts >= 1, search_steps >= 1, T > 0, on_budget 'stop' or 'raise'"
            )
        super().__init__(**kwargs)
        self.labels: torch.Tensor | None = None  # the teacher's class of each pool image
        self.scores: torch.Tensor | None = None  # N x C soft labels (NaN: not computed yet)
        self.exhausted = False

    def per_image_cost(self) -> int:
        return (int(self.hparams.num_classes) - 1) * self.hparams.n_starts * self.hparams.search_steps

    def on_fit_start(self) -> None:
        super().on_fit_start()
        n = len(self.pool_dataset())
        labels = [self.client.query(self.client.prepare(self.pool_images(p))).cpu() for p in torch.arange(n).split(256)]
        self.labels = torch.cat(labels).long()
        self.scores = torch.full((n, int(self.hparams.num_classes)), float("nan"))

    def starts(self, i: int, target: int) -> torch.Tensor:
        """Indices of up to ``n_starts`` pool images the teacher puts in ``target``, drawn with a per-image seed."""
        assert self.labels is not None
        pool = (self.labels == target).nonzero().flatten()
        g = torch.Generator().manual_seed(self.hparams.search_seed * 1_000_003 + i)
        return pool[torch.randperm(len(pool), generator=g)[: self.hparams.n_starts]]

    def boundary_distances(self, idx: list[int]) -> torch.Tensor:
        """N x C shortest distances to the teacher's boundary towards each class (``inf``: none searched)."""
        assert self.labels is not None
        C = int(self.hparams.num_classes)
        rows, x0s, xts, targets = [], [], [], []
        for r, i in enumerate(idx):
            for t in range(C):
                if t == int(self.labels[i]):
                    continue
                for j in self.starts(i, t).tolist():
                    rows.append(r * C + t)
                    x0s.append(i)
                    xts.append(j)
                    targets.append(t)
        dist = torch.full((len(idx) * C,), float("inf"))
        if not rows:
            return dist.view(len(idx), C)
        x0 = self.client.prepare(self.pool_images(x0s))
        xt = self.client.prepare(self.pool_images(xts))
        target = torch.tensor(targets, device=x0.device)
        lo, hi = torch.zeros(len(rows), device=x0.device), torch.ones(len(rows), device=x0.device)
        for _ in range(self.hparams.search_steps):
            mid = (lo + hi) / 2
            probe = x0 + mid.view(-1, 1, 1, 1) * (xt - x0)
            turned = self.client.query(probe).to(x0.device) == target
            hi, lo = torch.where(turned, mid, hi), torch.where(turned, lo, mid)
        d = (hi * (xt - x0).flatten(1).norm(dim=1)).cpu()
        return dist.scatter_reduce(0, torch.tensor(rows), d, reduce="amin").view(len(idx), C)

    def label_batch(self, index: torch.Tensor) -> None:
        assert self.scores is not None and self.labels is not None
        todo = [int(i) for i in index if self.scores[int(i), 0].isnan()]
        if not todo or self.exhausted:
            return
        remaining = self.client.remaining
        if remaining is not None and remaining < len(todo) * self.per_image_cost():
            if self.hparams.on_budget == "raise":
                raise QueryBudgetExceeded(
                    f"DB3KD: labelling {len(todo)} more images needs up to {len(todo) * self.per_image_cost()} "
                    f"queries but {remaining} of query_budget={self.client.query_budget} are left"
                )
            todo = todo[: remaining // self.per_image_cost()]
            self.exhausted = True
            if not todo:
                return
        scores = boundary_soft_labels(self.boundary_distances(todo), self.labels[todo])
        self.scores[todo] = scores

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        assert self.scores is not None
        index = batch["index"].cpu()
        self.label_batch(index)
        keep = ~self.scores[index, 0].isnan()
        self.log("queries/labelled_images", float((~self.scores[:, 0].isnan()).sum()), on_step=True)
        if not keep.any():
            return None
        x = self.client.prepare(batch["image"][keep.to(batch["image"].device)])
        loss = boundary_kl(self(x), self.scores[index[keep]].to(x.device), self.hparams.T)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss


__all__ = ["AL", "AM", "DAFL", "DB3KD", "KN", "LogitDiscriminator", "random_crop"]
