"""Write generated samples from a GAN checkpoint: N per class (or per label value) to a tensor file or folder.

    python -m kd_lightning.sample --ckpt runs/fashion_mnist/cgan/checkpoints/last.ckpt --per_class 100 --out fake.pt
    python -m kd_lightning.sample --ckpt CCGAN.ckpt --per_label 50 --n_label_values 20 --out fake_dir/
    kdl sample --ckpt DCGAN.ckpt --n 1000 --out fake.pt

A ``.pt`` output holds ``{"images": uint8 N x C x H x W, "labels": class ids (int64) or labels in
original units (float32; ``labels_normalised`` in [0, 1]), "seed", "ema", "checkpoint"}``; any other
path is a folder with one sub-folder per class (or label value) of PNGs (an ImageFolder layout).
Files are written through a temporary name and renamed, so an interrupted run never leaves a
half-written file under the final name. Same checkpoint + seed = same images, on any device.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from torchvision.utils import save_image

from kd_lightning.checkpoints import check_file, trust
from kd_lightning.errors import ConfigError, KDLError
from kd_lightning.fileio import atomic_write_bytes, folder_problem
from kd_lightning.flags import parse_bool, resolve_device  # resolve_device: re-exported (its old home)
from kd_lightning.gans import labels_per_class

if TYPE_CHECKING:
    from kd_lightning.methods.gan import GANTask


def sample_labels(
    task: GANTask,
    per_class: int | None,
    per_label: int | None,
    label_values: list[float] | None,
    n_label_values: int,
    n: int | None,
) -> torch.Tensor | int:
    """The label vector (or count) to sample for the generator's condition."""
    condition = task.generator.condition
    if condition == "class":
        if per_class is None or per_class < 1:
            raise ConfigError(f"--per_class {per_class}: a class-conditional GAN needs --per_class N with N >= 1")
        return labels_per_class(per_class, int(task.hparams.num_classes))
    if condition == "continuous":
        if per_label is None:
            raise ConfigError("a CcGAN needs --per_label N (with --label_values or --n_label_values)")
        values = (
            torch.tensor(label_values, dtype=torch.float32) if label_values else torch.linspace(0, 1, n_label_values)
        )
        if values.min() < 0 or values.max() > 1:
            raise ConfigError(f"--label_values {label_values}: expected normalised labels in [0, 1]")
        return values.repeat_interleave(per_label)
    if n is None:
        raise ConfigError("an unconditional GAN needs --n N")
    return n


def write_samples(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    out: str,
    meta: dict[str, Any],
    label_range: tuple[float, float] | None = None,
) -> None:
    """Save images in [0, 1] (and labels) to ``out`` (``.pt`` file or a folder of PNGs), atomically."""
    as_uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
    shown = labels
    if labels is not None and labels.is_floating_point() and label_range is not None:
        lo, hi = label_range
        shown = labels * (hi - lo) + lo
    if out.endswith(".pt"):
        payload = {"images": as_uint8, "labels": shown, **meta}
        if labels is not None and labels.is_floating_point():
            payload["labels_normalised"] = labels
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(out, buf.getvalue())
        return
    for i, img in enumerate(images):
        sub = (
            "all"
            if shown is None
            else (f"{int(shown[i])}" if not shown.is_floating_point() else f"{float(shown[i]):.4f}")
        )
        buf = io.BytesIO()
        save_image(img, buf, format="png")
        atomic_write_bytes(os.path.join(out, sub, f"{i:07d}.png"), buf.getvalue())


def check_out(out: str) -> None:
    """Refuse an ``--out`` that cannot be written before sampling: a folder through a file, a file over a folder."""
    if out.endswith(".pt") and os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a folder; expected a .pt file to write (or a folder without .pt)")
    if not out.endswith(".pt") and os.path.isfile(out):
        raise ConfigError(f"--out {out!r} is a file; expected a folder for the PNGs (or a path ending in .pt)")
    problem = folder_problem(os.path.dirname(os.path.abspath(out)) if out.endswith(".pt") else out)
    if problem:
        raise ConfigError(f"--out {out!r}: {problem}")


def build_parser() -> argparse.ArgumentParser:
    """Build ``kdl sample``'s argument parser."""
    p = argparse.ArgumentParser(prog="kdl sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by kdl fit with a ConditionalGAN/CcGAN/DCGAN")
    p.add_argument("--out", required=True, help="a .pt file, or a folder for PNGs (one sub-folder per label)")
    p.add_argument("--per_class", type=int, help="images per class (class-conditional GANs)")
    p.add_argument("--per_label", type=int, help="images per label value (CcGAN)")
    p.add_argument("--label_values", type=float, nargs="+", help="CcGAN: normalised label values in [0, 1]")
    p.add_argument("--n_label_values", type=int, default=10, help="CcGAN: evenly spaced values in [0, 1]")
    p.add_argument("--n", type=int, help="number of images (unconditional GANs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent codes")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--weights_only",
        type=lambda v: str(v).lower() not in ("false", "0", "no"),
        default=True,
        help="false: unpickle --ckpt (that file only; trust it) when it holds more than tensors and plain values",
    )
    # booleans follow kd_lightning.flags: a bare flag means true, and it also takes true/false
    p.add_argument("--raw", type=parse_bool, nargs="?", const=True, default=False,
                   help="use the raw generator instead of its EMA copy")  # fmt: skip
    p.add_argument("--no_progress", type=parse_bool, nargs="?", const=True, default=False, help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``kdl sample``; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if not args.weights_only:
            trust(check_file(args.ckpt))  # this file only
        from kd_lightning.loading import load_gan

        device = resolve_device(args.device)
        check_out(args.out)
        task = load_gan(args.ckpt)
        labels = sample_labels(task, args.per_class, args.per_label, args.label_values, args.n_label_values, args.n)
        gen = task.sampler_generator(ema=not args.raw)
        images = gen.sample(
            labels, seed=args.seed, batch_size=args.batch_size, device=device, progress=not args.no_progress
        )
        meta = {"seed": args.seed, "ema": not args.raw, "checkpoint": os.path.abspath(args.ckpt)}
        write_samples(
            images, None if isinstance(labels, int) else labels, args.out, meta, task.hparams.get("label_range")
        )
    except KDLError as e:
        print(f"kdl sample: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder
        from kd_lightning.sampling.generate import os_error_line

        print(f"kdl sample: error: {os_error_line(e, args.out, 'the samples')}", file=sys.stderr)
        return 2
    print(f"wrote {len(images)} samples to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
