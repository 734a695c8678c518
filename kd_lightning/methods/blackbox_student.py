"""The black-box student template shared by MEKD and its baselines, and the link to the black-box teacher.

A :class:`BlackBoxStudent` is a classifier trained only from a black-box teacher's answers on query images (local
images, or G(z) with a frozen generator) and evaluated on labelled val/test. :class:`TeacherLink` connects a module
to its teacher at fit start, through the public API of :class:`~kd_lightning.teachers.client.QueryClient`, and
writes the query statistics (``queries/stats.json``) at every epoch end and when the fit ends.

From answers to "logits" (:func:`answer_logits`): soft answers p give the teacher's logits up to a constant per
image, so the teacher side is the centred ``log p`` and the student side its centred logits (the same
representative of each). Hard answers become one-hot vectors used as logits (as MEKD's official code), facing the
student's raw logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.fileio import atomic_write_bytes
from kd_lightning.methods.base import BaseTask
from kd_lightning.methods.supervised import NetTask
from kd_lightning.metrics import classification_metrics
from kd_lightning.teachers.blackbox import QueryClient, Responses, WireDType, connect_teacher
from kd_lightning.teachers.frozen_generator import load_frozen_generator


class TeacherLink:
    """Connect a module to its black-box teacher lazily (at fit start), so that loading a checkpoint needs no teacher.

    The journal defaults to ``<trainer.default_root_dir>/queries/journal.bin`` so a resumed run finds it; the
    query statistics are written to ``queries/stats.json`` next to it (:meth:`write_stats`), each record tagged
    with ``tag`` (which stage or method wrote it).
    """

    def __init__(self, module: BaseTask, tag: dict[str, Any]) -> None:
        self.module = module
        self.tag = tag
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
        client.open()
        if num_classes is not None and client.num_classes and client.num_classes != num_classes:
            raise ConfigError(
                f"the teacher at {hp.teacher} answers {client.num_classes} classes but the model has "
                f"num_classes={num_classes}"
            )
        self.client = client
        self.stats_path = root / "queries" / "stats.json"
        return client

    def write_stats(self) -> dict[str, Any]:
        """Write ``queries/stats.json`` (the client's counts, the budget and the tag) and return what was written.

        Nothing is written, and ``{}`` returned, while no teacher is connected.
        """
        if self.client is None:
            return {}
        counts = self.client.refresh_stats().as_dict()
        stats = {**counts, "query_budget": self.client.query_budget, **self.tag}
        if self.spent_before:
            stats["spent_before"] = self.spent_before  # paid by earlier stages (spent_before), not in journal_*
        atomic_write_bytes(self.stats_path, json.dumps(stats, indent=2).encode())
        return stats

    def finish(self) -> None:
        """The last statistics of a fit or test, then the connection closed."""
        self.write_stats()
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class PoolCache:
    """Rows computed once per fit for the items of a fixed query pool, looked up by the batch's pool ``index``.

    A frozen generator's image of latent code z_i (and MEKD's G(T(x_i)/tau)) is the same at every epoch, so
    recomputing it is waste: after the first epoch every row is a lookup. A batch with any item not yet held is
    computed whole, exactly as without the cache, and its rows are kept. The rows are bit-identical to a
    recomputation because the values depend only on the item (the frozen generator is in eval mode and oneDNN
    gives each image of a batch of the same size the same result wherever it sits in the batch: tested in
    tests/test_mekd.py by training with and without the cache). Held in memory only (not in checkpoints).
    """

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None
        self.held: torch.Tensor | None = None

    def clear(self) -> None:
        self.values = self.held = None

    def get(self, index: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The rows of ``index``: looked up when all are held, else ``compute()`` (the whole batch), kept."""
        index = index.long().cpu()
        held = self.held
        if self.values is not None and held is not None and int(index.max()) < len(held) and bool(held[index].all()):
            return self.values[index.to(self.values.device)]
        out = compute()
        self._keep(index, out.detach())
        return out

    def _keep(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        need = int(index.max()) + 1
        if self.values is None or self.held is None or self.values.shape[1:] != rows.shape[1:]:
            self.values = rows.new_empty((need, *rows.shape[1:]))
            self.held = torch.zeros(need, dtype=torch.bool)
        elif need > len(self.held):  # grow (pool indices arrive in shuffled order)
            size = max(need, 2 * len(self.held))
            values = rows.new_empty((size, *rows.shape[1:]))
            values[: len(self.values)] = self.values
            held = torch.zeros(size, dtype=torch.bool)
            held[: len(self.held)] = self.held
            self.values, self.held = values, held
        self.values[index.to(self.values.device)] = rows.to(self.values.device)
        self.held[index] = True


def answer_logits(answers: torch.Tensor, responses: Responses, num_classes: int) -> torch.Tensor:
    """Teacher answers as logits: centred ``log p`` (soft) or one-hot vectors (hard)."""
    if responses == "soft":
        logp = answers.float().clamp_min(1e-12).log()
        return logp - logp.mean(-1, keepdim=True)
    return F.one_hot(answers.long(), num_classes).float()


def check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, with a message naming both."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}; expected one of {', '.join(repr(a) for a in allowed)}")


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
    generator: nn.Module  # the frozen generator of ``generator`` (DAFL trains a generator of its own)
    #: keep the frozen generator's query images (and MEKD's teacher-side images) per pool item for the fit
    #: (:class:`PoolCache`; same results, see its doc). ``False`` recomputes them at every step.
    pool_cache: bool = True

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
        check_choice("responses", responses, ("soft", "hard"))
        self._pending = (None if generator is None else load_frozen_generator(generator, ema_generator),)
        super().__init__(**kwargs)
        self.link = TeacherLink(self, {"method": type(self).__name__})
        self.query_cache = PoolCache()
        self.pool_index: torch.Tensor | None = None  # pool indices of the training batch being distilled

    def pool_cached(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether this batch's per-item values may come from a :class:`PoolCache`.

        They may with a frozen generator (its images depend on the pool item alone) behind this class's own
        :meth:`query_images`.
        """
        return (
            self.pool_cache
            and bool(self.hparams.get("generator"))
            and "index" in batch
            and type(self).query_images is BlackBoxStudent.query_images
        )

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
        self.query_cache.clear()
        self.link.connect(self.hparams.num_classes)

    def on_train_epoch_end(self) -> None:
        stats = self.link.write_stats()
        if stats:
            self.log_dict({f"queries/{k}": float(stats[k]) for k in ("journal_spent", "journal_bytes_up")})

    def on_fit_end(self) -> None:
        self.link.finish()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        client = self.link.client
        if client is None:
            raise RuntimeError(f"{type(self).__name__}: the teacher is not connected (on_fit_start has not run)")
        cached = self.pool_cached(batch)
        if cached:
            x = self.query_cache.get(batch["index"], lambda: client.prepare(self.query_images(batch).detach()))
        else:
            x = client.prepare(self.query_images(batch).detach())
        answers = client.query(x)  # every batch goes through the client: journal, budget and counts as before
        self.pool_index = batch["index"] if cached else None
        try:
            parts = self.distill_loss(x, self(x), answers)
        finally:
            self.pool_index = None
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


__all__ = ["BlackBoxStudent", "PoolCache", "TeacherLink", "answer_logits", "check_choice"]
