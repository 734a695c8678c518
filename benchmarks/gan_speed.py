"""GAN training speed: ``kdl fit`` of the class-conditional GAN against a plain PyTorch loop of the same step.

One step is what :class:`~kd_lightning.methods.gan.ConditionalGAN` does per batch with ``n_critic = n_gen = 1``:
a discriminator update on the real batch and a fake one drawn for its labels (generator under ``no_grad``), a
generator update, and the EMA update of the generator copy. The plain loop does exactly that with the same nets
(``kd_lightning.gans``), losses, Adam settings and DataLoader, in a hand-written loop; kdl runs the recipe
``recipes/cgankd/fashion_mnist/cgan.yaml`` (the cGAN-KD Fashion-MNIST GAN: z 64, widths 32, batch 64, no
DiffAugment) through ``kdl``'s CLI. Both run in this one process, alternating per repeat, in every mode asked:

- ``fp32``: ``32-true``;
- ``bf16``: kdl ``--trainer.precision bf16-mixed``; the plain loop ``torch.autocast(dtype=bfloat16)``;
- ``compiled``: fp32, generator and discriminator compiled (kdl: the ``Compile`` callback with
  ``modules: [generator, discriminator]``; the plain loop: ``nn.Module.compile``); compilation is not timed;
- ``bf16-compiled``: both.

Images/s count real images per step (the batch) over the steady steps (start-to-start intervals after
``--warmup-steps``), as ``benchmarks/throughput.py`` does. Model FLOPs of one step (both updates, forward and
backward, with ``torch.utils.flop_counter``) give the share of the fp32 matmul peak measured before each repeat.

    python -m benchmarks.gan_speed                                   # all four modes, 3 repeats
    python -m benchmarks.gan_speed --modes fp32 bf16 --out docs/results/gan_speed.md
    python -m benchmarks.gan_speed --g-ch 8 --d-ch 8 --steps 3 --repeats 1 --modes fp32 bf16   # a quick check

Quality (whether bf16 or compiled training changes the GAN) needs full runs, not this benchmark. Ready to run
(3 seeds x 3 modes of the 3,400-step recipe, ~35 min each on one idle core, then FID / Intra-FID / label
consistency against the real-vs-real floor with the project's teacher features):

    for seed in 0 1 2; do for mode in fp32 bf16 compiled; do
      extra=(); [ $mode = bf16 ] && extra=(--trainer.precision bf16-mixed)
      [ $mode = compiled ] && extra=(--trainer.callbacks+=kd_lightning.callbacks.Compile \\
          --trainer.callbacks.init_args.modules '[generator, discriminator]')
      kdl fit --config recipes/cgankd/fashion_mnist/cgan.yaml --seed_everything $seed \\
          --trainer.default_root_dir runs/gan_quality/$mode/$seed "${extra[@]}"
      python -m benchmarks.gan_quality --gan runs/gan_quality/$mode/$seed/checkpoints/last.ckpt \\
          --teacher runs/cgankd/fashion_mnist/teacher/checkpoints/best.ckpt \\
          --out docs/results/gan_quality_${mode}_seed$seed.md
    done; done

(the teacher is the pipeline's,
``kdl pipeline --config recipes/cgankd/fashion_mnist/pipeline.yaml --only teacher``; compare each mode's FID
and label consistency with fp32's spread over the three seeds). Timings vary with the machine's load: never
assert them in tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import (
    NO_CHECKPOINTS,
    NO_LOGGER,
    REPO,
    StepTimer,
    count_flops,
    fp32_peak_flops,
    quiet_lightning,
    report,
    steady_rate,
    sync,
)
from kd_lightning.callbacks import Compile
from kd_lightning.cli import build_cli, cpu_defaults
from kd_lightning.data import DigitsDataModule, FashionMNISTDataModule
from kd_lightning.gans import ResNetDiscriminator, ResNetGenerator, d_loss_parts, g_loss

RECIPE = REPO / "recipes" / "cgankd" / "fashion_mnist" / "cgan.yaml"
MODES = ("fp32", "bf16", "compiled", "bf16-compiled")


def _data_args(args: argparse.Namespace) -> list[str]:
    if args.data == "digits":  # no Fashion-MNIST on this machine: digits at the same 28 px
        return ["--data", "DigitsDataModule", "--data.init_args.image_size", "28", "--data.init_args.augment", "false"]
    return []


def _datamodule(args: argparse.Namespace) -> DigitsDataModule | FashionMNISTDataModule:
    if args.data == "digits":
        return DigitsDataModule(batch_size=args.batch, image_size=28, augment=False)
    return FashionMNISTDataModule(batch_size=args.batch, augment=False, val_fraction=0.1, train_size=5000, seed=0)


def run_kdl(args: argparse.Namespace, mode: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--config",
            str(RECIPE),
            *_data_args(args),
            "--data.init_args.batch_size",
            str(args.batch),
            "--model.init_args.g_ch",
            str(args.g_ch),
            "--model.init_args.d_ch",
            str(args.d_ch),
            "--trainer.max_steps",
            str(2 * (args.warmup_steps + args.steps + 1)),  # a D and a G step per batch
            "--trainer.default_root_dir",
            tmp,
            "--trainer.accelerator",
            args.accelerator,
            "--trainer.precision",
            "bf16-mixed" if mode.startswith("bf16") else "32-true",
            *NO_LOGGER,
            *NO_CHECKPOINTS,
        ]
        cli = build_cli(argv, run=False)
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        if mode.endswith("compiled"):
            cli.trainer.callbacks.append(Compile(modules=["generator", "discriminator"]))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return steady_rate(timer.starts, args.batch, args.warmup_steps)


def plain_nets(args: argparse.Namespace, device: torch.device) -> tuple[ResNetGenerator, ResNetDiscriminator]:
    g = ResNetGenerator(28, 1, args.z_dim, args.g_ch, "class", 10, shared_dim=128).to(device)
    d = ResNetDiscriminator(28, 1, args.d_ch, "class", 10).to(device)
    return g, d


def plain_step(
    g: ResNetGenerator,
    d: ResNetDiscriminator,
    g_ema: ResNetGenerator,
    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    image: torch.Tensor,
    label: torch.Tensor,
    bf16: bool,
    z_dim: int,
) -> None:
    """One D update, one G update and the EMA update, as ConditionalGAN's training step (hinge loss)."""
    opt_g, opt_d = opts
    device = image.device
    real = image * 2 - 1
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            fake = g(torch.randn(len(real), z_dim, device=device), label)
        real_d, fake_d = d_loss_parts(d(real, label), d(fake, label), "hinge")
        d_loss = real_d + fake_d
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = g_loss(d(g(torch.randn(len(real), z_dim, device=device), label), label), "hinge")
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    with torch.no_grad():  # decay 0.995, as the recipe after ema_start
        for pe, p in zip(g_ema.parameters(), g.parameters()):
            pe.lerp_(p, 0.005)
        for be, b in zip(g_ema.buffers(), g.buffers()):
            if be.is_floating_point():
                be.lerp_(b, 0.005)
            else:
                be.copy_(b)


def run_plain(args: argparse.Namespace, mode: str) -> float:
    dm = _datamodule(args)
    dm.setup("fit")
    loader = DataLoader(dm.train_dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=0)
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    g, d = plain_nets(args, device)
    g_ema = copy.deepcopy(g).requires_grad_(False)
    opts = (torch.optim.Adam(g.parameters(), 2e-4, (0.0, 0.999)), torch.optim.Adam(d.parameters(), 2e-4, (0.0, 0.999)))
    if mode.endswith("compiled"):
        g.compile(dynamic=False)
        d.compile(dynamic=False)
    starts: list[tuple[int, float]] = []
    n = args.warmup_steps + args.steps + 1
    for i, batch in enumerate(loader):
        if i >= n:
            break
        sync(device)
        starts.append((0, time.perf_counter()))
        image, label = batch["image"].to(device), batch["label"].to(device)
        plain_step(g, d, g_ema, opts, image, label, mode.startswith("bf16"), args.z_dim)
    return steady_rate(starts, args.batch, args.warmup_steps)


def step_flops_per_image(args: argparse.Namespace) -> float:
    g, d = plain_nets(args, torch.device("cpu"))
    opts = (torch.optim.SGD(g.parameters(), 0.0), torch.optim.SGD(d.parameters(), 0.0))
    image, label = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    g_ema = copy.deepcopy(g)
    return count_flops(lambda: plain_step(g, d, g_ema, opts, image, label, False, args.z_dim)) / args.batch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--data", choices=("fashion", "digits"), default="fashion")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--z-dim", type=int, default=64, help="the recipe's z_dim (kept in both loops)")
    p.add_argument("--g-ch", type=int, default=32)
    p.add_argument("--d-ch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after the warm-up ones)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--accelerator", default="cpu", help="cpu or gpu (kdl and the plain loop alike)")
    p.add_argument("--peak-flops", type=float, help="the peak to compare with (FLOP/s; a GPU's bf16 peak)")
    p.add_argument("--out", type=Path, help="write the results as markdown here")
    args = p.parse_args(argv)
    if args.z_dim != 64:
        p.error("--z-dim is the recipe's (64); change the recipe to time another")
    quiet_lightning()
    cpu_defaults()

    rates: dict[tuple[str, str], list[float]] = {(m, w): [] for m in args.modes for w in ("kdl", "plain")}
    peaks: list[float] = []
    for r in range(args.repeats):
        peaks.append(args.peak_flops or fp32_peak_flops(seconds=0.6))
        for mode in args.modes:
            for who in ("kdl", "plain"):
                torch.manual_seed(r)
                rate = run_kdl(args, mode) if who == "kdl" else run_plain(args, mode)
                rates[mode, who].append(rate)
                print(f"repeat {r}: {mode:13s} {who:5s} {rate:8.1f} img/s", flush=True)
    flops = step_flops_per_image(args)
    load = os.getloadavg()
    lines = [
        f"ConditionalGAN step (D + G + EMA), z {args.z_dim}, widths {args.g_ch}/{args.d_ch}, batch {args.batch}, "
        f"28 px {args.data}, {args.accelerator}, {torch.get_num_threads()} threads, {args.repeats} alternating "
        f"repeats of {args.steps} timed steps; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "",
        "| mode | kdl img/s | plain img/s | kdl/plain (median of repeats) | kdl % of fp32 peak | plain % |",
        "|---|---|---|---|---|---|",
    ]
    for mode in args.modes:
        kdl, plain = rates[mode, "kdl"], rates[mode, "plain"]
        ratio = statistics.median(k / q for k, q in zip(kdl, plain))
        share = {w: statistics.median(x * flops / pk for x, pk in zip(rates[mode, w], peaks)) for w in ("kdl", "plain")}
        lines.append(
            f"| {mode} | {statistics.median(kdl):.1f} | {statistics.median(plain):.1f} | {ratio:.3f} "
            f"| {100 * share['kdl']:.1f}% | {100 * share['plain']:.1f}% |"
        )
    measured = ", ".join(f"{x / 1e9:.1f}" for x in peaks)
    lines += [
        "",
        f"{'given' if args.peak_flops else 'fp32 matmul'} peak: {statistics.median(peaks) / 1e9:.1f} GFLOP/s"
        f"{'' if args.peak_flops else ' (one measured before each repeat: ' + measured + ')'}; model FLOPs per "
        f"image and step: {flops / 1e6:.1f} MFLOP (bf16 runs are compared with the fp32 peak too)",
    ]
    report("\n".join(lines), args.out, "GAN training speed: kdl fit vs a plain PyTorch loop")


if __name__ == "__main__":
    main()
