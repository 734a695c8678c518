"""cGAN-KD's data quality, raw -> subsampled -> filtered (the Table 6 analog), and the speed of kdl generate.

    python -m benchmarks.cgankd_quality --generator G.ckpt --density_ratio DR.ckpt --teacher T.ckpt \\
        --judge J.ckpt --per_class 300 --out runs/quality

One ``kdl generate`` run with ``keep_rejected`` keeps every proposal, so the three sets come from the
same latent draws: raw (every proposal, i.e. plain GAN samples), subsampled (accepted by cDR-RS) and
filtered (kept by the teacher filter). Each set is cut to the same number of images per class before
FID (own features: the judge's penultimate layer, against the real training images), Intra-FID and
label consistency (by the judge, a different net than the filtering teacher, and by the teacher).
Speed: proposals per second of the whole generate stage (generator + DR encoder + DR head + teacher;
the teacher's outputs are the DR encoder's when they are the same checkpoint) and the share of the
fp32 matmul peak measured in the same process, counting the FLOPs of one proposal with
``torch.utils.flop_counter``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import count_flops, fp32_peak_flops
from kd_lightning.callbacks.gan_quality import save_grid_png
from kd_lightning.metrics.gan import TeacherFeatures, fid_from_features, intra_fid, label_consistency
from kd_lightning.sampling.generate import GenerateConfig, Generation, generate
from kd_lightning.teachers import FrozenTeacher


def flops_per_proposal(run: Generation, batch: int = 50) -> float:
    """FLOPs of one proposal through the generate stage (generator, DR features and head, teacher if separate)."""
    unit = run.units[0]

    def one_batch() -> None:
        p = run.propose(unit, "flops", batch)
        run.add_teacher({k: v for k, v in p.items() if k not in ("uniform", "inside")})

    return count_flops(one_batch) / batch


def real_images(teacher_ckpt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The real training subset the teacher saw (from its checkpoint's recipe), as floats in [0, 1] at 28 px."""
    from kd_lightning.checkpoints import load_checkpoint
    from kd_lightning.data import FashionMNISTDataModule

    cfg = load_checkpoint(teacher_ckpt).get("kdl_config", {}).get("data", {}).get("init_args", {})
    dm = FashionMNISTDataModule(
        val_fraction=cfg.get("val_fraction", 0.1),
        train_size=cfg.get("train_size"),
        seed=cfg.get("seed", 0),
        augment=False,
    )
    dm.setup("fit")
    ds = dm.train_dataset
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    labels = torch.tensor([int(ds[i]["label"]) for i in range(len(ds))])
    return images, labels


def equal_per_class(mask: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    rows = [np.nonzero(mask & (labels == c))[0][:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--density_ratio", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--judge", required=True, help="an independent classifier (another net) for label consistency")
    ap.add_argument("--per_class", type=int, default=300)
    ap.add_argument("--rho", type=float, default=0.9)
    ap.add_argument("--burn_in", type=int, default=5000)
    ap.add_argument("--max_proposals_factor", type=float, default=200.0, help="see kdl generate")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    cfg = GenerateConfig(
        generator=args.generator, density_ratio=args.density_ratio, teacher=args.teacher, out=str(out / "store"),
        per_class=args.per_class, rho=args.rho, burn_in=args.burn_in, keep_rejected=True, seed=args.seed,
        max_proposals_factor=args.max_proposals_factor,
        batch_size=500, shard_size=5000, progress=False,
    )  # fmt: skip
    peak = fp32_peak_flops()
    run = Generation(cfg)
    flops = flops_per_proposal(run)
    t0 = time.perf_counter()
    store, timing = generate(cfg)
    wall = time.perf_counter() - t0
    peak_after = fp32_peak_flops()
    rate = (timing["proposed"] + timing["burn_in"]) / max(timing["seconds"], 1e-9)
    speed = {
        "proposals": timing["proposed"],
        "burn_in_images": timing["burn_in"],
        "seconds": timing["seconds"],
        "wall_seconds_incl_burn_in": wall,
        "images_per_s": rate,
        "accepted_per_s": store.report["n_accepted"] / max(timing["seconds"], 1e-9),
        "flops_per_proposal": flops,
        "fp32_matmul_peak_flops_before": peak,
        "fp32_matmul_peak_flops_after": peak_after,
        "share_of_peak": rate * flops / max(peak, peak_after),
        "teacher_reused_from_dr_encoder": run.teacher_is_encoder,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(speed, indent=1), file=sys.stderr)

    table = store.table()
    images = torch.from_numpy(store.load_images()).float() / 255
    labels = table["label"]
    accepted, kept = table["accepted"].astype(bool), table["kept"].astype(bool)
    allrows = np.ones_like(accepted)
    n = min(int(np.bincount(labels[m], minlength=10).min()) for m in (allrows, accepted, kept))
    judge = TeacherFeatures(FrozenTeacher.from_checkpoint(args.judge), image_size=32)
    teacher = FrozenTeacher.from_checkpoint(args.teacher)
    real_x, real_y = real_images(args.teacher)
    real_f, _ = judge.batched(real_x)
    rows = {}
    for name, mask in (("raw", allrows), ("subsampled", accepted), ("filtered", kept)):
        idx = equal_per_class(mask, labels, n)
        x, y = images[idx], torch.from_numpy(labels[idx])
        f, judge_logits = judge.batched(x)
        fid = fid_from_features(real_f, f)
        ifid, _ = intra_fid(real_f, real_y, f, y)
        t_logits = torch.from_numpy(table["teacher"][idx])
        rows[name] = {
            "images": len(idx),
            "per_class": n,
            "fid": fid,
            "intra_fid": ifid,
            "label_consistency_judge": label_consistency(judge_logits, y),
            "label_consistency_teacher": label_consistency(t_logits, y),
        }
        print(name, json.dumps(rows[name]), file=sys.stderr)
    rows["real_vs_real"] = {"fid": fid_from_features(real_f[::2], real_f[1::2])}
    del teacher

    # grids: per class, 10 kept and 10 dropped (accepted by cDR-RS, then dropped by the filter), and 10 rejected
    for what, mask in (("kept", kept), ("dropped", accepted & ~kept), ("rejected", ~accepted)):
        pick = [np.nonzero(mask & (labels == c))[0][:10] for c in range(10)]
        grid = torch.zeros(100, *images.shape[1:])
        for c, p in enumerate(pick):
            grid[c * 10 : c * 10 + len(p)] = images[p]
        save_grid_png(grid, str(out / f"grid_{what}.png"), nrow=10)
    shutil.copy(store.root / "filter_hist.png", out / "filter_hist.png")
    result = {"speed": speed, "quality": rows, "report": store.report, "settings": store.settings}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))


if __name__ == "__main__":
    main()
