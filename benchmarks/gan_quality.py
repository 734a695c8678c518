"""Quality and sampling speed of a trained class-conditional GAN, against a real-vs-real baseline.

Everything is measured in one process, on the test split of an MNIST-format dataset (Fashion-MNIST):

- Features: the penultimate layer of a classifier trained in this project (``--teacher``, a kdl
  checkpoint); no Inception weights are downloaded, so the numbers are comparable with each other
  and with the baseline below, not with published FIDs.
- The test split is cut per class into two disjoint halves A and B (``--per_class`` images each).
  FID / Intra-FID of ``--per_class`` generated images per class against A are reported next to the
  same metrics for real half B against A (the real-vs-real floor for this many images).
- Label consistency: the share of generated images the teacher classifies as their assigned class,
  next to the teacher's accuracy on half B.
- Sampling speed: images/s of the EMA generator (batch ``--batch``, fp32, the process's threads), as a
  share of the fp32 peak of this machine, measured here with large ``torch.mm`` (``benchmarks.common``,
  as every benchmark does); generator FLOPs per image by ``torch.utils.flop_counter``.

    python -m benchmarks.gan_quality --gan runs/fashion_mnist/cgan/checkpoints/last.ckpt \\
        --teacher runs/fashion_mnist/teacher/checkpoints/best.ckpt --out docs/results/cgan_fashion_mnist.md \\
        --grid docs/cgan_fashion_mnist.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import count_flops, fp32_peak_flops, seconds_per_call
from kd_lightning.callbacks.gan_quality import save_grid_png
from kd_lightning.checkpoints import load_checkpoint
from kd_lightning.data.mnist import FASHION_MNIST_DEBIAN_ROOT, load_mnist_split
from kd_lightning.gans import labels_per_class
from kd_lightning.methods.gan import load_gan
from kd_lightning.metrics.gan import TeacherFeatures, fid_from_features, intra_fid, label_consistency
from kd_lightning.teachers import FrozenTeacher


def halves(images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: the first ``n`` images (A) and the next ``n`` (B); returns A, B and their labels (same order)."""
    a, b, y = [], [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2 * n:
            raise SystemExit(f"class {int(c)} has {len(idx)} test images; --per_class {n} needs {2 * n}")
        a.append(images[idx[:n]])
        b.append(images[idx[n : 2 * n]])
        y.append(labels[idx[:n]])
    return torch.cat(a), torch.cat(b), torch.cat(y)


def sampling_rate(gen: torch.nn.Module, labels: torch.Tensor, batch: int) -> float:
    """Images/s of ``gen.sample`` on ``labels`` in batches of ``batch`` (the fastest timed pass)."""
    return len(labels) / seconds_per_call(lambda: gen.sample(labels, seed=0, batch_size=batch), best=True)


def generator_flops_per_image(gen: torch.nn.Module, labels: torch.Tensor) -> float:
    z = torch.randn(len(labels), gen.z_dim)
    gen.eval()
    with torch.no_grad():
        return count_flops(lambda: gen(z, labels)) / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gan", required=True, help="ConditionalGAN checkpoint")
    p.add_argument("--teacher", required=True, help="classifier checkpoint (features and label consistency)")
    p.add_argument("--root", default=FASHION_MNIST_DEBIAN_ROOT, help="folder with the MNIST-format idx files")
    p.add_argument("--per_class", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=500, help="sampling batch for the speed measurement")
    p.add_argument("--out", help="write the results as markdown here")
    p.add_argument("--grid", help="write a 10-per-class sample grid PNG of the EMA generator here")
    p.add_argument("--grid_raw", help="write the same grid of the raw (non-EMA) generator here")
    p.add_argument("--budget", default="", help="a line describing the training budget, copied into --out")
    args = p.parse_args()

    task = load_gan(args.gan)
    ckpt_step = int(load_checkpoint(args.gan)["global_step"])
    teacher = FrozenTeacher.from_checkpoint(args.teacher)
    size = int(load_checkpoint(args.teacher)["hyper_parameters"]["image_size"])
    feats = TeacherFeatures(teacher, size)
    images, labels = load_mnist_split(args.root, "test")
    real_a, real_b, y_real = halves(images.float() / 255, labels, args.per_class)
    f_a, _ = feats.batched(real_a)
    f_b, out_b = feats.batched(real_b)
    num_classes = int(task.hparams.num_classes)
    y_fake = labels_per_class(args.per_class, num_classes)
    rows = []
    for name, gen in (("generator (EMA)", task.generator_ema), ("generator (raw)", task.generator)):
        fake = gen.sample(y_fake, seed=args.seed, batch_size=500)
        f_fake, out_fake = feats.batched(fake)
        rows.append(
            (
                name,
                fid_from_features(f_a, f_fake),
                intra_fid(f_a, y_real, f_fake, y_fake)[0],
                label_consistency(out_fake, y_fake),
            )
        )
    rows.append(
        (
            "real test half B (baseline)",
            fid_from_features(f_a, f_b),
            intra_fid(f_a, y_real, f_b, y_real)[0],
            label_consistency(out_b, y_real),
        )
    )
    peak = fp32_peak_flops()
    rate = sampling_rate(task.generator_ema, y_fake[: 4 * args.batch], args.batch)
    flops = generator_flops_per_image(task.generator_ema, y_fake[: args.batch])
    share = rate * flops / peak
    for path, gen in ((args.grid, task.generator_ema), (args.grid_raw, task.generator)):
        if path:
            save_grid_png(gen.sample(labels_per_class(10, num_classes), seed=args.seed), path, nrow=10)

    lines = [
        f"GAN: `{args.gan}` (global step {ckpt_step}: D and G updates); teacher: `{args.teacher}` "
        f"({teacher.describe()}); {args.per_class} images per class; latent seed {args.seed}; "
        f"torch threads {torch.get_num_threads()}.",
    ]
    if args.budget:
        lines.append(f"Budget: {args.budget}")
    lines += [
        "",
        "| images | FID (own features) | Intra-FID (own features) | label consistency |",
        "|---|---|---|---|",
        *[f"| {n} | {fid:.3f} | {ifid:.3f} | {100 * lc:.1f}% |" for n, fid, ifid, lc in rows],
        "",
        f"Chance label consistency: {100 / num_classes:.1f}%. The baseline row's label consistency is the teacher's "
        "accuracy on real test images.",
        "",
        f"Sampling (EMA generator, batch {args.batch}, fp32): {rate:.0f} images/s; {flops / 1e6:.1f} MFLOP per image; "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s -> {100 * share:.1f}% of peak.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
