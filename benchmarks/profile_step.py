"""Where one training step's time goes: data loading, host-side transforms, forward, backward, optimiser and
the framework around them, for ``kdl fit`` runs of the supervised step, BLKD (teacher run every step, and
teacher outputs cached by sample index) and the class-conditional GAN step.

Every moment of the timed steps is charged to exactly one phase, the innermost one running (explicit
``perf_counter`` timers in this process; CPU ops are synchronous, so wall time is where the work is):

- data loading: the DataLoader's ``next()`` (sampler, indexing, collate), less the transforms inside it;
- host transforms: the per-sample transform (augmentation, padding, uint8 -> float);
- forward (<net>): forward hooks on each network (student, teacher, generator, discriminator);
- loss/metrics/logging: the rest of ``training_step`` (losses, torchmetrics updates, ``self.log``);
- backward: between Lightning's ``on_before_backward`` and ``on_after_backward``;
- optimiser: ``optimizer.step`` less the closure that runs inside it (and ``zero_grad``);
- EMA update (GAN);
- framework: everything else between two training steps (Lightning's loop, hooks, callbacks).

Steps after ``--warmup-steps`` of the last epoch are timed; the scenarios alternate within every repeat,
and each phase's median over the repeats is reported. The model FLOPs of one step (forward + backward,
teacher included) are counted with ``torch.utils.flop_counter`` on a step before the timed ones, and the
step rate is given as a share of the fp32 matmul peak measured (with ``benchmarks.common``'s
helper) right before each scenario, in this process.

    python -m benchmarks.profile_step                          # all scenarios, 2 repeats
    python -m benchmarks.profile_step --scenarios supervised blkd --out docs/results/profile_step.md
    python -m benchmarks.profile_step --accelerator gpu --precision bf16-mixed --teacher-net resnet56

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import NO_CHECKPOINTS, NO_LOGGER, REPO, fp32_peak_flops, quiet_lightning, report
from kd_lightning.cli import build_cli, cpu_defaults

SCENARIOS = ("supervised", "blkd", "blkd-cached", "gan")
PHASES = (
    "data loading",
    "host transforms",
    "forward",
    "forward (teacher)",
    "forward (generator)",
    "forward (discriminator)",
    "loss/metrics/logging",
    "backward",
    "optimiser",
    "EMA update",
    "framework",
)


class PhaseClock:
    """Charges wall time to the innermost open phase (``framework`` when none is open) while active."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync  # a GPU's synchronize: queued kernels are charged to the phase that queued them
        self.stack: list[str] = []
        self.totals: dict[str, float] = defaultdict(float)
        self.active = False
        self.t = time.perf_counter()

    def _tick(self) -> None:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        if self.active:
            self.totals[self.stack[-1] if self.stack else "framework"] += now - self.t
        self.t = now

    def push(self, name: str) -> None:
        self._tick()
        self.stack.append(name)

    def pop(self, name: str) -> None:
        self._tick()
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] == name:
                del self.stack[i]
                break

    def start(self) -> None:
        self._tick()
        self.active = True

    def stop(self) -> None:
        self._tick()
        self.active = False

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop(name)

        return timed


class StepProfiler(L.Callback):
    """Installs the phase timers on the model and data, times the steps of the last epoch after warm-up, and
    counts one step's FLOPs (the step just before the timed ones)."""

    def __init__(self, clock: PhaseClock, nets: Callable[[L.LightningModule], dict[str, torch.nn.Module]], warmup: int):
        self.clock, self.nets, self.warmup = clock, nets, warmup
        self.steps = 0
        self.seconds = 0.0
        self.flops = 0.0
        self._counter: FlopCounterMode | None = None
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        c = self.clock
        for label, module in self.nets(pl_module).items():
            name = f"forward ({label})" if label else "forward"
            self._handles.append(module.register_forward_pre_hook(lambda *_, n=name: c.push(n)))
            self._handles.append(module.register_forward_hook(lambda *_, n=name: c.pop(n), always_call=True))
        pl_module.training_step = c.wrap("loss/metrics/logging", pl_module.training_step)  # type: ignore[method-assign]
        if hasattr(pl_module, "update_ema"):
            pl_module.update_ema = c.wrap("EMA update", pl_module.update_ema)  # type: ignore[method-assign]
        self._handles.append(register_optimizer_step_pre_hook(lambda *_: c.push("optimiser")))
        self._handles.append(register_optimizer_step_post_hook(lambda *_: c.pop("optimiser")))
        dm = trainer.datamodule
        ds = getattr(dm.train_dataset, "dataset", dm.train_dataset)  # Subset(IndexedDataset)
        if hasattr(ds, "transform"):
            ds.transform = c.wrap("host transforms", ds.transform)
        it = torch.utils.data.dataloader._BaseDataLoaderIter
        self._next = it.__next__
        it.__next__ = c.wrap("data loading", self._next)  # type: ignore[method-assign]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.utils.data.dataloader._BaseDataLoaderIter.__next__ = self._next  # type: ignore[method-assign]
        for h in self._handles:
            h.remove()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.clock.push("backward")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.pop("backward")

    def _last_epoch(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch == trainer.max_epochs - 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self._last_epoch(trainer) and idx == self.warmup - 1:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self._last_epoch(trainer):
            return
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = float(self._counter.get_total_flops()), None
        if idx == self.warmup - 1:
            self._t0 = time.perf_counter()
            self.clock.start()
        elif idx >= self.warmup and idx == trainer.num_training_batches - 1:
            self.clock.stop()
            self.seconds = time.perf_counter() - self._t0
            self.steps = idx - self.warmup + 1


def make_teacher(args: argparse.Namespace, root: str) -> str:
    """A teacher checkpoint (weights after a few steps: the speed does not depend on how good it is)."""
    cli = build_cli(
        [
            "--config",
            str(REPO / "recipes" / "digits" / "teacher.yaml"),
            "--model.init_args.net",
            args.teacher_net,
            "--data.init_args.image_size",
            str(args.image_size),
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            root,
            *NO_LOGGER,
            "--trainer.limit_val_batches",
            "0",
            "--trainer.accelerator",
            "cpu",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return str(Path(root) / "checkpoints" / "last.ckpt")


def scenario_argv(kind: str, args: argparse.Namespace, teacher: str, root: str) -> list[str]:
    common = [
        "--trainer.default_root_dir",
        root,
        *NO_LOGGER,
        "--trainer.limit_val_batches",
        "0",
        *NO_CHECKPOINTS,
        "--trainer.accelerator",
        args.accelerator,
        "--trainer.precision",
        args.precision,
        "--trainer.limit_train_batches",
        str(args.warmup_steps + args.steps),
        "--data.init_args.batch_size",
        str(args.batch),
        "--data.init_args.image_size",
        str(args.image_size),
    ]
    if kind == "gan":
        return [
            "--config",
            str(REPO / "recipes" / "cgankd" / "digits" / "cgan.yaml"),
            # the Fashion-MNIST cGAN's widths (recipes/cgankd/fashion_mnist/cgan.yaml), on digits
            "--model.init_args.z_dim",
            "64",
            "--model.init_args.g_ch",
            "32",
            "--model.init_args.d_ch",
            "32",
            "--model.init_args.diffaugment",
            "",
            "--trainer.max_steps",
            "-1",
            "--trainer.max_epochs",
            "1",
            *common,
        ]
    recipe = "student.yaml" if kind == "supervised" else "blkd.yaml"
    argv = [
        "--config",
        str(REPO / "recipes" / "digits" / recipe),
        "--model.init_args.net",
        args.net,
        "--trainer.max_epochs",
        "2" if kind == "blkd-cached" else "1",
        "--model.init_args.lr_scheduler.init_args.T_max",
        "2",
        *common,
    ]
    if kind != "supervised":
        argv += ["--model.init_args.teacher", teacher]
    if kind == "blkd-cached":  # the cache fills in epoch 1 (no augmentation: outputs are per sample)
        argv += ["--model.init_args.cache_teacher", "true", "--data.init_args.augment", "false"]
        # the whole first epoch fills the cache; the second is timed
        argv[argv.index("--trainer.limit_train_batches") + 1] = "1.0"
    return argv


def nets_of(pl_module: L.LightningModule) -> dict[str, torch.nn.Module]:
    if hasattr(pl_module, "generator") and hasattr(pl_module, "discriminator"):
        return {"generator": pl_module.generator, "discriminator": pl_module.discriminator}
    nets = {"": pl_module.net}
    teacher = getattr(pl_module, "teacher", None)
    if teacher is not None:
        nets["teacher"] = teacher.net
    return nets


def run(kind: str, args: argparse.Namespace, teacher: str, tmp: str) -> dict[str, Any]:
    clock = PhaseClock(torch.cuda.synchronize if args.accelerator in ("gpu", "cuda") else None)
    cli = build_cli(scenario_argv(kind, args, teacher, f"{tmp}/{kind}"), run=False)
    prof = StepProfiler(clock, nets_of, args.warmup_steps)
    cli.trainer.callbacks.append(prof)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if prof.steps == 0:
        raise RuntimeError(f"{kind}: no step was timed (fewer than {args.warmup_steps + 1} batches per epoch?)")
    return {
        "ms": {k: 1000 * v / prof.steps for k, v in clock.totals.items()},
        "step_ms": 1000 * prof.seconds / prof.steps,
        "flops": prof.flops,
    }


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--net", default="resnet20", help="the student (supervised and BLKD)")
    p.add_argument("--teacher-net", default="resnet56")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="timed steps per scenario (digits: 20 batches/epoch at 64)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--peak-flops", type=float, help="use this peak (FLOP/s) instead of measuring the fp32 matmul peak")
    p.add_argument("--out", type=Path, help="write the table as markdown here")
    args = p.parse_args(argv)
    quiet_lightning()
    cpu_defaults()
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.scenarios}
    peaks: dict[str, list[float]] = {k: [] for k in args.scenarios}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_teacher(args, f"{tmp}/teacher") if {"blkd", "blkd-cached"} & set(args.scenarios) else ""
        for r in range(args.repeats):
            for kind in args.scenarios:
                peaks[kind].append(args.peak_flops or fp32_peak_flops(seconds=0.6))
                torch.manual_seed(r)
                results[kind].append(run(kind, args, teacher, f"{tmp}/r{r}"))
                print(f"repeat {r}: {kind:12s} {results[kind][-1]['step_ms']:8.1f} ms/step", flush=True)
    load = os.getloadavg()
    header = ["phase (ms per step, median)", *args.scenarios]
    lines = [
        f"student {args.net}, teacher {args.teacher_net}, batch {args.batch}, digits at {args.image_size}x"
        f"{args.image_size}, GAN: the Fashion-MNIST cGAN widths (z 64, ch 32) on the same data; "
        f"{args.accelerator}, {args.precision}, {torch.get_num_threads()} threads, {args.steps} timed steps after "
        f"{args.warmup_steps}, {args.repeats} alternated repeats; load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    med = {k: {ph: statistics.median(r["ms"].get(ph, 0.0) for r in results[k]) for ph in PHASES} for k in results}
    step = {k: statistics.median(r["step_ms"] for r in results[k]) for k in results}
    for ph in PHASES:
        if any(med[k][ph] > 0 for k in results):
            cells = [f"{med[k][ph]:.1f} ({100 * med[k][ph] / step[k]:.0f}%)" for k in results]
            lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    lines.append("| **step** | " + " | ".join(f"**{step[k]:.1f}**" for k in results) + " |")
    lines.append("| img/s | " + " | ".join(f"{1000 * args.batch / step[k]:.1f}" for k in results) + " |")
    lines.append(
        "| model GFLOP per step | " + " | ".join(f"{results[k][0]['flops'] / 1e9:.2f}" for k in results) + " |"
    )
    shares = {
        k: statistics.median(r["flops"] / (r["step_ms"] / 1000) / pk for r, pk in zip(results[k], peaks[k]))
        for k in results
    }
    lines.append("| % of the peak | " + " | ".join(f"{100 * shares[k]:.1f}%" for k in results) + " |")
    all_peaks = [x for v in peaks.values() for x in v]
    lines += [
        "",
        f"peak (fp32 matmul, measured before each run): median {statistics.median(all_peaks) / 1e9:.1f} GFLOP/s "
        f"(range {min(all_peaks) / 1e9:.1f}-{max(all_peaks) / 1e9:.1f})",
    ]
    return report("\n".join(lines), args.out, "One training step, phase by phase")


if __name__ == "__main__":
    main()
