"""``kdl oracle``: the oracle store, held-out REAL images written as a cGAN-KD sample store.

    kdl oracle --config recipes/cgankd/fashion_mnist/oracle.yaml
    kdl oracle --config recipes/cgankd/fashion_mnist/oracle.yaml --per_class 1000 --out runs/oracle

A perfect generator and filter would hand the student real images of the right class. The oracle
store is that bound: ``per_class`` training images per class that the student never sees (neither
its ``train_size`` subset nor the validation split), with their true labels, the teacher's logits
and the same M2 (per-class rho-quantile filter, optional replacement) as ``kdl generate``, written
with the same store writer. Its manifest, shard layout, columns and dtypes are those of a generated
store, so every DataModule, notebook and report reads it unchanged, and a table can show the share of
the oracle's gain a GAN delivers: ``(cGAN-KD - NOKD) / (oracle - NOKD)``.

The held-out pool is the training split minus the validation split minus the student's subset (the
DataModule's own seeded split); a pool with fewer than ``per_class`` images of a class is refused.
Images are taken as the DataModule's evaluation transform gives them (its ``image_size``), as uint8.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.sampling.filtering import check_rho
from kd_lightning.sampling.generate import MICRO_BATCH, GenerateConfig, Generation
from kd_lightning.sampling.store import SampleStore, sha256_file

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

    from kd_lightning.data.base import ImageDataModule


@dataclass
class OracleConfig:
    """Settings of ``kdl oracle`` (the names and meanings of ``kdl generate``'s where they overlap).

    Args:
        teacher: the filtering teacher (kdl classifier checkpoint).
        out: the store folder (created; an existing store with the same settings is kept).
        per_class: held-out real images per class (the store's size before filtering).
        rho: filtering quantile (default 0.9, the paper's for classification).
        filter: M2's per-class filtering (as ``kdl generate``).
        replace: replace the true labels by the teacher's argmax (default false: the paper's classification).
        seed: seed of the draw from the held-out pool.
        batch_size: images per shard unit chunk and teacher pass.
        shard_size: samples per shard (at least; a shard ends at a chunk boundary).
        teacher_image_size: side the teacher takes (default: its checkpoint's ``image_size``).
        device: where the teacher runs.
    """

    teacher: str
    out: str
    per_class: int
    rho: float | None = None
    filter: bool = True
    replace: bool = False
    seed: int = 0
    batch_size: int = 500
    shard_size: int = 5000
    teacher_image_size: int | None = None
    device: str = "cpu"


def held_out_indices(dm: ImageDataModule) -> torch.Tensor:
    """Indices into ``dm.build_dataset("train")`` that are in neither the student's subset nor the validation split."""
    base = dm.build_dataset("train")
    train_idx, val_idx = dm._split_indices(base)
    used = torch.zeros(len(base), dtype=torch.bool)  # type: ignore[arg-type]  # map-style datasets have a length
    used[train_idx] = True
    used[val_idx] = True
    return (~used).nonzero().flatten()


def draw_per_class(
    labels: torch.Tensor, pool: torch.Tensor, per_class: int, num_classes: int, seed: int
) -> list[torch.Tensor]:
    """``per_class`` indices of each class from ``pool`` (a seeded draw, sorted); refused when a class has fewer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(num_classes):
        idx = pool[labels[pool] == c]
        if len(idx) < per_class:
            raise ConfigError(
                f"per_class={per_class}: only {len(idx)} held-out images of class {c} (the training split minus the "
                "validation split and the student's train_size subset); lower per_class or train_size"
            )
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]].sort().values)
    return out


class OracleRun(Generation):
    """M2 and the store's table exactly as :class:`Generation` writes them, for held-out real images.

    No generator and no density-ratio model: only the settings the inherited teacher pass and
    :meth:`Generation.finalize` read are set here.
    """

    def __init__(self, cfg: OracleConfig, dm: ImageDataModule) -> None:
        from kd_lightning.teachers import FrozenTeacher

        if cfg.per_class < 1:
            raise ConfigError(f"per_class={cfg.per_class}; expected a positive integer")
        for name in ("batch_size", "shard_size"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name}={getattr(cfg, name)}; expected a positive integer")
        if dm.task != "classification" or dm.num_classes is None:
            raise ConfigError(f"{type(dm).__name__} is a {dm.task} DataModule; kdl oracle is for classification")
        self.oracle_cfg, self.dm = cfg, dm
        # what the inherited teacher pass and finalize() read
        self.cfg = GenerateConfig(generator="", out=cfg.out, teacher=cfg.teacher, filter=cfg.filter)
        self.device = torch.device(cfg.device)
        self.micro_batch = MICRO_BATCH  # images per teacher pass, as kdl generate's
        self.grad_mode = torch.inference_mode
        self.task = "classification"
        self.subsample = False
        self.replace = cfg.replace
        self.label_range = None
        self.rho = 0.9 if cfg.rho is None else cfg.rho
        check_rho(self.rho)
        self.teacher = FrozenTeacher.from_checkpoint(cfg.teacher).to(self.device)
        if self.teacher.task != "classification":
            raise ConfigError(
                f"{self.teacher.describe()} is a {self.teacher.task} model; kdl oracle needs a classifier"
            )
        if self.teacher.num_classes != dm.num_classes:
            raise ConfigError(
                f"{self.teacher.describe()} has {self.teacher.num_classes} classes but {type(dm).__name__} has "
                f"{dm.num_classes}"
            )
        from kd_lightning.sampling.generate import _image_size

        self.teacher_size = int(cfg.teacher_image_size or _image_size(cfg.teacher))
        self.teacher_is_encoder = False

    def data_settings(self) -> dict[str, Any]:
        dm = self.dm
        return {
            "class": type(dm).__name__,
            "root": str(dm.root) if dm.root is not None else None,
            "val_fraction": dm.val_fraction,
            "train_size": dm.train_size,
            "seed": dm.seed,
            "image_size": dm.image_size,
        }

    def settings(self) -> dict[str, Any]:
        """``kdl generate``'s settings keys (no generator, no DR model, no subsampling) plus ``oracle``."""
        cfg = self.oracle_cfg
        num_classes = int(self.dm.num_classes or 0)
        return {
            "generator_sha256": None,
            "density_ratio_sha256": None,
            "teacher_sha256": sha256_file(cfg.teacher),
            "task": self.task,
            "units": [[f"class-{c}", c, cfg.per_class] for c in range(num_classes)],
            "rho": self.rho,
            "subsample": False,
            "filter": cfg.filter,
            "replace": self.replace,
            "burn_in": 0,
            "update_max": False,
            "kappa": 0.0,
            "vicinity_check": False,
            "keep_rejected": False,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "shard_size": cfg.shard_size,
            "ema": False,
            "teacher_image_size": self.teacher_size,
            "label_range": None,
            "oracle": self.data_settings(),
        }

    def draw(self) -> None:
        """Choose the held-out images (refused, before anything is written, when the pool is too small)."""
        from kd_lightning.data.base import dataset_labels

        cfg, dm = self.oracle_cfg, self.dm
        self.base = dm.build_dataset("train")
        self.labels = dataset_labels(self.base).long()
        pool = held_out_indices(dm)
        self.picks = draw_per_class(self.labels, pool, cfg.per_class, int(dm.num_classes or 0), cfg.seed)

    def write(self, store: SampleStore) -> dict[str, Any]:
        """Every class's held-out images with true labels and teacher outputs, then M2 and the table."""
        cfg, dm = self.oracle_cfg, self.dm
        base, labels, picks = self.base, self.labels, self.picks
        transform = dm.eval_transform()
        for c, idx in enumerate(picks):
            unit = f"class-{c}"
            if store.progress(unit).get("done"):
                continue
            buffer: list[dict[str, torch.Tensor]] = []
            done = 0
            for s in range(0, len(idx), cfg.batch_size):
                chunk = idx[s : s + cfg.batch_size]
                images = torch.stack([transform(base[int(i)][0]) for i in chunk])
                u8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
                n = len(chunk)
                take = {
                    "image": u8,
                    "label": labels[chunk],
                    "gen_label": labels[chunk].float(),
                    "ratio": torch.full((n,), float("nan")),
                    "accepted": torch.ones(n, dtype=torch.bool),
                    "proposal": chunk.long(),  # the image's index in the real training set
                }
                self.add_teacher(take)
                take = {
                    k: take[k]
                    for k in ("image", "label", "gen_label", "ratio", "teacher", "error", "accepted", "proposal")
                }
                buffer.append(take)
                done += n
                if sum(len(b["label"]) for b in buffer) >= cfg.shard_size or done == len(idx):
                    state = {
                        "next_chunk": s // cfg.batch_size + 1,
                        "accepted": done,
                        "proposed": done,
                        "burn_in": 0,
                        "max_ratio": None,
                        "done": done == len(idx),
                    }
                    store.add_shard(unit, {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}, state)
                    buffer = []
        return self.finalize(store)


def build_oracle(cfg: OracleConfig, dm: ImageDataModule) -> SampleStore:
    """Write (or keep, when finished with the same settings) the oracle store ``cfg.out``."""
    run = OracleRun(cfg, dm)
    run.draw()
    store = SampleStore(cfg.out, run.settings())
    if any(p.get("done") is False for p in store.manifest["progress"].values()):
        # a shard boundary is not a resume point here (the draw is cheap): start the store again
        raise KDLError(f"the oracle store {cfg.out!r} was interrupted; delete the folder and run kdl oracle again")
    if not store.finished:
        run.write(store)
    return store


def build_parser() -> ArgumentParser:
    from jsonargparse import ActionConfigFile, ArgumentParser

    import kd_lightning.data  # noqa: F401 - registers the DataModules' short class names
    from kd_lightning.data.base import ImageDataModule

    parser = ArgumentParser(prog="kdl oracle", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="an oracle.yaml")
    parser.add_class_arguments(OracleConfig, as_group=False)
    parser.add_subclass_arguments(ImageDataModule, "data", required=True, help="the real DataModule (its split)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kdl oracle`` (returns the exit status)."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv if argv is not None else sys.argv[1:])
        init = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    except KDLError as e:
        print(f"kdl oracle: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - jsonargparse's parse errors
        print(f"kdl oracle: error: {e}", file=sys.stderr)
        return 2
    dm = init.data
    args = {k: ns[k] for k in OracleConfig.__dataclass_fields__ if k in ns}
    try:
        cfg = OracleConfig(**args)
        store = build_oracle(cfg, dm)
    except KDLError as e:
        print(f"kdl oracle: error: {e}", file=sys.stderr)
        return 2
    rep = store.report
    print(
        f"oracle store {cfg.out}: {rep.get('n_accepted')} held-out real images, {rep.get('n_kept')} kept; "
        f"label consistency (teacher vs true label) {rep.get('label_consistency_before', float('nan')):.4f} before, "
        f"{rep.get('label_consistency_after', float('nan')):.4f} after filtering",
        file=sys.stderr,
    )
    from kd_lightning.sampling.consistency import store_chance_warning

    if warning := store_chance_warning(cfg.out):
        print(warning, file=sys.stderr)
    return 0


__all__ = ["OracleConfig", "OracleRun", "build_oracle", "draw_per_class", "held_out_indices", "main"]
