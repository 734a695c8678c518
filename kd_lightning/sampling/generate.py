"""``kdl generate``: GAN samples -> cDR-RS subsampling -> teacher filtering / relabelling -> a sample store.

    kdl generate --config recipes/cgankd/fashion_mnist/generate.yaml
    kdl generate --generator G.ckpt --density_ratio DR.ckpt --teacher T.ckpt --per_class 5000 --out store/

For every class (or every value of a label grid, regression) the generator's proposals come in
chunks of ``batch_size`` whose random numbers depend only on ``(seed, unit, chunk)``; each proposal is
quantised to uint8 first (what the store keeps is what everything is computed on), then its density
ratio and the teacher's output are computed, and cDR-RS accepts it with probability r / M. Accepted
samples are written in shards of about ``shard_size``; the manifest records the next chunk after
every shard, so a killed run resumes at the last shard and ends with the same bytes as an
uninterrupted one. When every unit is full, M2 runs over the store: the per-class (classification) or
global (regression) rho-quantile cut-off of the teacher's errors, then (regression) replacement of
the label by the teacher's prediction; the per-sample table, the report and the error histogram
are written, and the store is finished.

Reopening a folder whose settings differ (checkpoint hashes, counts, rho, seed, ...) is refused,
naming each difference.

Where the parts are: the options and the checks that need no checkpoint are
:mod:`~kd_lightning.sampling.generate_config`; cDR-RS and M1's report are :mod:`~kd_lightning.sampling.rejection`;
M2 is :func:`~kd_lightning.sampling.filtering.filter_and_relabel` (pure functions, no networks). This module
(about 490 lines, more than the ~400 the package aims at) keeps one run's state in :class:`Generation` (the loaded
nets, the units, the chunks and shards of a resumable run) and the ``kdl generate`` command around it, which kdl's
command table names.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.metrics.gan import fit_size
from kd_lightning.sampling.filtering import (
    classification_errors,
    filter_and_relabel,
    histogram_png,
    regression_errors,
)
from kd_lightning.sampling.generate_config import GenerateConfig
from kd_lightning.sampling.rejection import accept, acceptance_report, check_trials, chunk_generator, estimate_max
from kd_lightning.sampling.store import SampleStore, sha256_file

#: images per network pass in generation: fixed, so that no batch-size-dependent kernel choice reaches a store
MICRO_BATCH = 100

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser
    from tqdm import tqdm


@dataclass
class Unit:
    """One condition with its quota: a class id or a (normalised) label value."""

    name: str
    label: float | int
    quota: int


class Generation:
    """The loaded models and resolved settings of one ``kdl generate`` run (see :func:`generate`)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        from kd_lightning.loading import load_gan
        from kd_lightning.sampling.density_ratio import load_density_ratio
        from kd_lightning.teachers import FrozenTeacher

        self.cfg = cfg
        if cfg.forward_batch is not None:
            import warnings

            warnings.warn(
                f"forward_batch={cfg.forward_batch} is ignored: kdl generate runs its networks on micro-batches of "
                f"{MICRO_BATCH} images, so that the store does not depend on it",
                FutureWarning,
                stacklevel=2,
            )
        self.micro_batch = MICRO_BATCH  # benchmarks/generation.py changes it to time other splits
        from kd_lightning.flags import resolve_device

        self.device = resolve_device(cfg.device)
        gan = load_gan(cfg.generator)
        self.label_range = gan.hparams.get("label_range")
        self.gen = gan.sampler_generator(cfg.ema).to(self.device).eval()
        self.run_gen: torch.nn.Module = self.gen  # what proposes: the generator, or its fast copy
        self.grad_mode = torch.inference_mode  # no autograd anywhere in generation
        if self.gen.condition == "none":
            raise ConfigError(f"generator {cfg.generator!r} is unconditional; kdl generate needs a conditional GAN")
        self.task = "classification" if self.gen.condition == "class" else "regression"
        self.subsample = cfg.density_ratio is not None if cfg.subsample is None else cfg.subsample
        self.dr = load_density_ratio(cfg.density_ratio, self.device) if cfg.density_ratio else None
        if self.dr is not None and self.dr.task != self.task:
            raise ConfigError(f"the DR model is for {self.dr.task} but the generator is {self.task}")
        self.teacher = FrozenTeacher.from_checkpoint(cfg.teacher).to(self.device) if cfg.teacher else None
        if self.teacher is not None and self.teacher.task != self.task:
            raise ConfigError(f"{self.teacher.describe()} is a {self.teacher.task} model; the generator is {self.task}")
        self.replace = (self.task == "regression") if cfg.replace is None else cfg.replace
        if self.replace and self.teacher is None:  # the default replace=None means true for a CcGAN
            raise ConfigError("replace=true needs teacher=<checkpoint>")
        self.rho = cfg.rho if cfg.rho is not None else (0.9 if self.task == "classification" else 0.7)
        self.teacher_size = (
            int(cfg.teacher_image_size or _image_size(cfg.teacher)) if cfg.teacher else cfg.teacher_image_size
        )
        self.units = self._units()
        # the DR encoder is the filtering teacher (the default): its outputs are the teacher's, no second pass
        self.teacher_is_encoder = bool(
            self.dr is not None
            and self.teacher is not None
            and cfg.teacher is not None
            and self.dr.encoder_sha256 == sha256_file(cfg.teacher)
            and self.dr.encoder_size == self.teacher_size
            and self.dr.layer == "penultimate"
        )
        self.set_fast_inference(cfg.fast_inference, cfg.compile)

    def set_fast_inference(self, on: bool, compiled: bool = False) -> None:
        """Folded BatchNorms in the frozen nets and a channels-last generator copy (on), or the nets as loaded.

        ``compiled``: those copies compiled with TorchInductor (see :class:`GenerateConfig`).
        """
        for frozen in (self.dr.encoder if self.dr is not None else None, self.teacher):
            if frozen is not None:
                frozen.fold_bn = on
                frozen.compile_inference = on and compiled
        if on:
            from kd_lightning.nets.fold import fold_bn

            self.run_gen = fold_bn(self.gen)[0].to(memory_format=torch.channels_last)
            for block in getattr(self.run_gen, "blocks", []):  # up-sampling is ~4x faster channels-last on CPU
                block.register_forward_pre_hook(_channels_last_input)
            if compiled:
                from kd_lightning.nets.compile import compile_frozen

                compile_frozen(self.run_gen, self.device)
        else:
            self.run_gen = self.gen

    def add_teacher(self, take: dict[str, torch.Tensor]) -> None:
        """The teacher's outputs (unless the DR encoder gave them) and errors for the samples to store."""
        if self.teacher is None:
            return
        with self.grad_mode():
            self._add_teacher(take)

    def _add_teacher(self, take: dict[str, torch.Tensor]) -> None:
        teacher, size = self.teacher, self.teacher_size
        assert teacher is not None and size is not None  # add_teacher checked; a teacher comes with its size
        if "teacher" not in take:
            xq = take["image"].float().to(self.device) / 255
            bs = self.micro_batch
            outs = [teacher(fit_size(xq[s : s + bs], size)).float().cpu() for s in range(0, len(xq), bs)]
            take["teacher"] = torch.cat(outs) if outs else torch.zeros(0, teacher.num_classes or 1)
        t, y = take["teacher"], take["label"]
        take["error"] = classification_errors(t, y) if self.task == "classification" else regression_errors(t, y)

    def _units(self) -> list[Unit]:
        cfg = self.cfg
        if self.task == "classification":
            if cfg.per_class is None or cfg.per_class < 1:
                raise ConfigError(f"per_class={cfg.per_class}; a class-conditional GAN needs a positive per_class")
            num_classes = self.gen.num_classes
            assert num_classes is not None  # a class-conditional generator has classes
            return [Unit(f"class-{c}", c, cfg.per_class) for c in range(int(num_classes))]
        if cfg.per_value is None or cfg.per_value < 1:
            raise ConfigError(f"per_value={cfg.per_value}; a CcGAN needs a positive per_value")
        values = cfg.label_values or np.linspace(0, 1, cfg.n_label_values).tolist()
        if min(values) < 0 or max(values) > 1:
            raise ConfigError(f"label_values={values}; expected normalised labels in [0, 1]")
        return [Unit(f"value-{v:.6f}", float(v), cfg.per_value) for v in values]

    def settings(self) -> dict[str, Any]:
        """What decides the store's bytes (compared when a store is reopened).

        ``max_proposals_factor`` is left out: it only bounds the work, so a run that stopped on it can be
        resumed with a larger bound. ``device`` and ``progress`` are left out too.
        """
        cfg = self.cfg
        return {
            "generator_sha256": sha256_file(cfg.generator),
            "density_ratio_sha256": sha256_file(cfg.density_ratio) if cfg.density_ratio else None,
            "teacher_sha256": sha256_file(cfg.teacher) if cfg.teacher else None,
            "task": self.task,
            "units": [[u.name, u.label, u.quota] for u in self.units],
            "rho": self.rho,
            "subsample": self.subsample,
            "filter": cfg.filter,
            "replace": self.replace,
            "burn_in": cfg.burn_in,
            "update_max": cfg.update_max,
            "kappa": cfg.kappa,
            "vicinity_check": cfg.vicinity_check,
            "keep_rejected": cfg.keep_rejected,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "shard_size": cfg.shard_size,
            "ema": cfg.ema,
            "teacher_image_size": self.teacher_size,
            "label_range": list(self.label_range) if self.label_range else None,
            # only when on: stores written before the option existed keep their settings
            **({"fast_inference": True} if cfg.fast_inference else {}),
            **({"compile": True} if cfg.compile else {}),
        }

    # ------------------------------------------------------------------ one chunk
    def propose(self, unit: Unit, chunk: int | str, n: int) -> dict[str, torch.Tensor]:
        """``n`` proposals for ``unit``: uint8 images, labels, density ratios, teacher outputs, uniforms."""
        with self.grad_mode():
            return self._propose(unit, chunk, n)

    def _propose(self, unit: Unit, chunk: int | str, n: int) -> dict[str, torch.Tensor]:
        g = chunk_generator(self.cfg.seed, unit.name, chunk)
        z = torch.randn(n, self.gen.z_dim, generator=g)
        uniforms = torch.rand(n, generator=g, dtype=torch.float64)
        if self.task == "classification":
            y = torch.full((n,), int(unit.label), dtype=torch.long)
            y_gen = y
        else:
            y = torch.full((n,), float(unit.label), dtype=torch.float32)
            offsets = torch.rand(n, generator=g)
            k = self.cfg.kappa
            y_gen = (y - k + 2 * k * offsets).clamp(0, 1) if k > 0 else y
        images = []
        fb = self.micro_batch
        for s in range(0, n, fb):
            x = self.run_gen(z[s : s + fb].to(self.device), y_gen[s : s + fb].to(self.device))
            images.append(((x.float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).cpu())
        u8 = torch.cat(images).contiguous()
        xq = u8.float().to(self.device) / 255
        out: dict[str, torch.Tensor] = {"image": u8, "label": y, "gen_label": y_gen.float(), "uniform": uniforms}
        inside = torch.ones(n, dtype=torch.bool)
        if self.dr is not None:
            ratios, preds = [], []
            for s in range(0, n, fb):
                h, enc_out = self.dr.features(xq[s : s + fb])
                ratios.append(self.dr.ratio_from_features(h, y[s : s + fb].to(self.device)).cpu())
                preds.append(enc_out.cpu())
            out["ratio"] = torch.cat(ratios).float()
            if (
                self.task == "regression"
                and self.cfg.kappa > 0
                and self.cfg.vicinity_check
                and self.dr.encoder.task == "regression"
            ):
                pred = torch.cat(preds).flatten()
                inside = (pred >= y - self.cfg.kappa) & (pred <= y + self.cfg.kappa)
        else:
            out["ratio"] = torch.full((n,), float("nan"))
        out["inside"] = inside
        if self.teacher_is_encoder:
            out["teacher"] = torch.cat(preds).float().view(n, -1)
        return out

    # ------------------------------------------------------------------ one unit
    def run_unit(self, store: SampleStore, unit: Unit, bar: tqdm | None) -> None:
        cfg = self.cfg
        state = dict(store.progress(unit.name))
        if state.get("done"):
            return
        if "max_ratio" not in state:
            m = None
            if self.subsample:
                if bar is not None:  # the burn-in accepts nothing: say what the bar is waiting for
                    bar.set_postfix_str(f"{unit.name} burn-in ({cfg.burn_in} proposals)")
                burn = self.propose(unit, "burnin", cfg.burn_in)
                m = estimate_max(burn["ratio"][burn["inside"]] if bool(burn["inside"].any()) else burn["ratio"])
            burned = cfg.burn_in if self.subsample else 0
            # not written yet: a resumed run repeats the (deterministic) burn-in until the unit's first shard
            state = {"next_chunk": 0, "accepted": 0, "proposed": 0, "burn_in": burned, "max_ratio": m, "done": False}
        max_proposals = math.ceil(cfg.max_proposals_factor * unit.quota)
        buffer: list[dict[str, torch.Tensor]] = []
        buffered = 0
        while state["accepted"] < unit.quota:
            check_trials(_describe(unit, self.task), state["proposed"], state["accepted"], unit.quota, max_proposals)
            k = state["next_chunk"]
            p = self.propose(unit, k, cfg.batch_size)
            if self.subsample:
                mask, m = accept(p["ratio"], p["uniform"], state["max_ratio"], cfg.update_max)
                mask &= p["inside"]
                state["max_ratio"] = m
            else:
                mask = p["inside"].clone()
            need = unit.quota - state["accepted"]
            positions = mask.nonzero().flatten()
            if len(positions) > need:  # the unit fills up inside this chunk: stop right after its last needed sample
                cut = int(positions[need - 1]) + 1
                mask[cut:] = False
                p = {key: v[:cut] for key, v in p.items()}
                mask = mask[:cut]
                n_seen = cut
            else:
                n_seen = len(mask)
            rows = torch.ones_like(mask) if cfg.keep_rejected else mask
            take = {key: v[rows] for key, v in p.items() if key not in ("uniform", "inside")}
            take["accepted"] = mask[rows]
            take["proposal"] = (k * cfg.batch_size + torch.arange(n_seen))[rows]
            self.add_teacher(take)
            buffer.append(take)
            buffered += int(mask.sum())
            state["accepted"] += int(mask.sum())
            state["proposed"] += n_seen
            state["next_chunk"] = k + 1
            if bar is not None:
                bar.update(int(mask.sum()))
                bar.set_postfix_str(f"{unit.name} acceptance {state['accepted'] / max(state['proposed'], 1):.1%}")
            if buffered >= cfg.shard_size or state["accepted"] >= unit.quota:
                state["done"] = state["accepted"] >= unit.quota
                arrays = {key: torch.cat([b[key] for b in buffer]) for key in buffer[0]}
                store.add_shard(unit.name, arrays, dict(state))
                buffer, buffered = [], 0

    # ------------------------------------------------------------------ M2 over the whole store
    def finalize(self, store: SampleStore) -> dict[str, Any]:
        """M2 over every shard (:func:`~kd_lightning.sampling.filtering.filter_and_relabel`), then the store's end.

        Writes the per-sample table, the report and the error histogram, and marks the store finished.
        """
        cols: dict[str, list[np.ndarray]] = {}
        for i, entry in enumerate(store.manifest["shards"]):
            arrays = store.read_shard(i)
            arrays.pop("image")
            arrays["shard"] = np.full(entry["n"], i, dtype=np.int32)
            arrays["row"] = np.arange(entry["n"], dtype=np.int32)
            for key, v in arrays.items():
                cols.setdefault(key, []).append(v)
        table = {k: np.concatenate(v) for k, v in cols.items()}
        accepted = table["accepted"].astype(bool)
        report = acceptance_report(store.manifest["progress"])
        report["subsample"], report["filter"], report["replace"], report["rho"] = (
            self.subsample,
            self.cfg.filter,
            self.replace,
            self.rho,
        )
        scale = (self.label_range[1] - self.label_range[0]) if self.label_range else 1.0
        m2 = filter_and_relabel(
            table["label"],
            accepted,
            table.get("teacher"),
            table.get("error"),
            task="classification" if self.task == "classification" else "regression",
            rho=self.rho,
            filter=self.cfg.filter,
            replace=self.replace,
            label_scale=scale,
        )
        report.update(m2.report)
        table.update({"kept": m2.kept, "replaced": m2.replaced, "final_label": m2.final_label})
        table.pop("uniform", None)
        if m2.cutoffs is not None:
            errors = table["error"].astype(np.float64)[accepted]
            title = f"teacher errors of accepted samples, rho={self.rho}"
            if self.task == "classification":
                xlabel, by_class = "cross-entropy (assigned label, teacher)", table["label"][accepted]
            else:
                xlabel, by_class = "|f_t(x) - y| (normalised)", None
            from kd_lightning.fileio import atomic_write_bytes

            hist = histogram_png(errors, by_class, m2.cutoffs, title, xlabel)
            atomic_write_bytes(str(store.root / "filter_hist.png"), hist)
        store.write_table(table, report)
        from kd_lightning.sampling.grids import write_store_grids

        write_store_grids(store)  # <store>/grids/{kept,dropped,rejected}.png
        return report


def _channels_last_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if x.dim() == 4 else args


def _describe(unit: Unit, task: str) -> str:
    return f"class {unit.label}" if task == "classification" else f"label value {unit.label:.4g}"


def _image_size(path: str) -> int:
    from kd_lightning.checkpoints import load_checkpoint

    return int(load_checkpoint(path).get("hyper_parameters", {}).get("image_size") or 32)


def generate(cfg: GenerateConfig) -> tuple[SampleStore, dict[str, Any]]:
    """Write (or resume) the store ``cfg.out``; returns it and a timing summary (not stored)."""
    from kd_lightning.fileio import folder_problem

    problem = folder_problem(cfg.out)
    if problem:  # before the models load: a wrong --out fails at once
        raise ConfigError(f"out={cfg.out!r}: {problem}; the store needs a writable folder")
    run = Generation(cfg)
    store = SampleStore(cfg.out, run.settings())
    start = time.perf_counter()
    done_before = sum(int(p.get("accepted", 0)) for p in store.manifest["progress"].values())
    if not store.finished:
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(u.quota for u in run.units), initial=done_before, desc="accepted", unit="img")
        try:
            for unit in run.units:
                run.run_unit(store, unit, bar)
        finally:
            if bar is not None:
                bar.close()
        run.finalize(store)
    seconds = time.perf_counter() - start
    proposed = sum(int(p.get("proposed", 0)) for p in store.manifest["progress"].values())
    burn_in = sum(int(p.get("burn_in", 0)) for p in store.manifest["progress"].values())
    return store, {"seconds": seconds, "proposed": proposed, "burn_in": burn_in}


def os_error_line(e: OSError, out: str | None, what: str = "the store") -> str:
    """One line for an ``OSError`` met while writing ``out``: what failed, on which file, and what to do."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    reason = e.strerror or str(e)
    written = os.path.abspath(str(e.filename)) if e.filename else ""
    target = os.path.abspath(out) if out else ""
    inside = bool(written and target) and (
        written == target
        or written.startswith(target + os.sep)
        or (os.path.dirname(written) == os.path.dirname(target) and os.path.basename(written).startswith(".tmp-"))
    )
    if e.errno == errno.ENOSPC:
        return (
            f"no space left on the device while writing {what} {out!r}{where}; free some space and run the same "
            "command again: it resumes from the last complete shard"
        )
    if inside:
        return f"cannot write {what} {out!r}: {reason}{where}; name a writable folder with --out"
    return f"{reason}{where}"


def build_parser() -> ArgumentParser:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="kdl generate", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a generate.yaml")
    parser.add_class_arguments(GenerateConfig, as_group=False)
    parser.add_argument("--quiet", type=bool, default=False, help="no progress bar (the same as --progress false)")
    return parser


#: boolean options: bare flags that also take true/false (kd_lightning.flags)
BOOL_OPTIONS = ("--quiet", *(f"--{f.name}" for f in fields(GenerateConfig) if "bool" in str(f.type)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kdl generate`` (returns the exit status)."""
    from kd_lightning.flags import normalize

    parser = build_parser()
    try:
        ns = parser.parse_args(normalize(argv if argv is not None else sys.argv[1:], bools=BOOL_OPTIONS))
    except Exception as e:  # noqa: BLE001 - jsonargparse's parse errors
        print(f"kdl generate: error: {e}", file=sys.stderr)
        return 2
    args = ns.as_dict() if hasattr(ns, "as_dict") else vars(ns)
    args.pop("config", None)
    if args.pop("quiet", False):
        args["progress"] = False
    try:
        cfg = GenerateConfig(**args)
        store, timing = generate(cfg)
    except KDLError as e:
        print(f"kdl generate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder, --out through a file
        print(f"kdl generate: error: {os_error_line(e, args.get('out'))}", file=sys.stderr)
        return 2
    rep = store.report
    lines = [f"store {cfg.out}: {rep.get('n_accepted')} accepted, {rep.get('n_kept')} kept"]
    lines.append(f"acceptance rate {rep.get('acceptance_rate', float('nan')):.2%}")
    for key in ("label_consistency_before", "label_consistency_after", "teacher_mae_before", "teacher_mae_after"):
        if key in rep:
            lines.append(f"{key} {rep[key]:.4f}")
    if timing["proposed"] and timing["seconds"] > 0:
        rate = (timing["proposed"] + timing["burn_in"]) / timing["seconds"]
        lines.append(f"{rate:.1f} images/s (proposals and burn-in; timing of a resumed run is partial)")
    print("; ".join(lines), file=sys.stderr)
    grids = sorted((store.root / "grids").glob("*.png"))
    if grids:
        print(f"sample grids (one row per class or label bin): {', '.join(str(g) for g in grids)}", file=sys.stderr)
    from kd_lightning.sampling.consistency import store_chance_warning

    if warning := store_chance_warning(cfg.out):
        print(warning, file=sys.stderr)
    return 0


__all__ = ["MICRO_BATCH", "GenerateConfig", "Generation", "generate", "main"]
