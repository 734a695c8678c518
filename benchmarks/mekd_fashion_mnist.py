"""MEKD evidence on Fashion-MNIST: top-1 against the query budget for MEKD and KD, soft and hard answers.

Runs the shipped recipes under ``recipes/mekd/fashion_mnist/`` through ``kdl fit`` + ``kdl test`` (one process per
run, at most ``--workers`` at once, one thread each), against a teacher checkpoint trained with
``recipes/mekd/fashion_mnist/teacher.yaml``, answered in-process (:class:`~kd_lightning.teachers.LocalTeacher`:
the same validation, journal and accounting as over HTTP).

A budget B is the total number of images the student side pays for: for MEKD the deprivatization stage's queries
count, so its distillation pool is B minus what its GAN spent; for KD the pool is B views of the 10,000 local images.

    OMP_NUM_THREADS=1 python -m benchmarks.mekd_fashion_mnist --teacher T.ckpt --out /work/runs/i14/evidence
    python -m benchmarks.mekd_fashion_mnist --out /work/runs/i14/evidence --report docs/mekd_budget.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import QUIET, REPO

RECIPES = REPO / "recipes" / "mekd" / "fashion_mnist"


def jobs(budgets: list[int], seeds: list[int], top: int) -> list[str]:
    """Most important first: every budget with seed 0, then the other seeds at the largest budget, then ML/DKD."""
    out = ["gan_soft", "gan_hard"]
    for b in sorted(budgets, reverse=True):
        out += [f"{m}_{r}_B{b}_s0" for m in ("mekd", "kd") for r in ("soft", "hard")]
        if b == top:
            out.append("ref_s0")
    for s in seeds:
        if s:
            out += [f"{m}_{r}_B{top}_s{s}" for m in ("mekd", "kd") for r in ("soft", "hard")]
            out.append(f"ref_s{s}")
    out += [f"ml_soft_B{top}_s0", f"dkd_soft_B{top}_s0"]
    return out


def run_job(name: str, args: argparse.Namespace) -> dict:
    from kd_lightning.cli import build_cli

    out = Path(args.out) / name
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if name.startswith("gan_"):
        r = name.split("_")[1]
        cfg = ["--config", str(RECIPES / f"deprivatize_{r}.yaml"), "--model.init_args.teacher", args.teacher]
        cfg += ["--trainer.default_root_dir", str(out), "--data.init_args.root", args.root]
        cfg += ["--trainer.max_steps", str(2 * args.gan_steps), "--model.init_args.im_interval", str(args.im_interval)]
        cfg += ["--model.init_args.im_batch_size", str(args.im_batch), "--model.init_args.ema_decay", str(args.ema)]
        cfg += ["--model.init_args.ema_start", str(args.gan_steps // 4)]
        t0 = time.perf_counter()
        build_cli(["fit", *cfg, *QUIET])
        stats = json.loads((out / "queries" / "stats.json").read_text())
        result = {"job": name, "fit_s": time.perf_counter() - t0, "queries": stats}
        done.write_text(json.dumps(result, indent=1))
        return result
    method, rest = name.split("_", 1)
    seed = int(name.rsplit("_s", 1)[1])
    common = ["--seed_everything", str(seed), "--trainer.default_root_dir", str(out)]
    common += ["--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(max(1, args.steps // 5))]
    if method == "ref":
        common = ["--config", str(RECIPES / "reference_true_labels.yaml"), *common, "--data.init_args.root", args.root]
        common += ["--data.init_args.batch_size", str(args.batch)]
        resp, budget = "-", 0
    else:
        resp, b = rest.split("_")[0], rest.split("_")[1]
        budget = int(b[1:])
        recipe = {"mekd": f"mekd_{resp}.yaml", "kd": f"kd_{resp}.yaml", "ml": "ml_soft.yaml", "dkd": "dkd_soft.yaml"}
        recipe["mekdtau2"] = recipe["mekd"]  # MEKD with Hinton's tau^2 on the KL (kl_scale: tau2)
        pool = budget
        if method.startswith("mekd"):
            gan = json.loads((Path(args.out) / f"gan_{resp}" / "result.json").read_text())
            pool = budget - int(gan["queries"]["journal_spent"])
            common += ["--model.init_args.generator", str(Path(args.out) / f"gan_{resp}" / "checkpoints" / "last.ckpt")]
        if method == "mekdtau2":
            common += ["--model.init_args.kl_scale", "tau2"]
        common = [
            "--config",
            str(RECIPES / recipe[method]),
            *common,
            "--model.init_args.teacher",
            args.teacher,
            "--model.init_args.query_budget",
            str(pool),
            "--data.init_args.pool_size",
            str(pool),
            "--data.init_args.seed",
            str(seed),
            "--data.init_args.local.init_args.root",
            args.root,
            "--data.init_args.batch_size",
            str(args.batch),
        ]
    t0 = time.perf_counter()
    cli = build_cli(["fit", *common, *QUIET])
    fit_s = time.perf_counter() - t0
    val = float(cli.trainer.checkpoint_callback.best_model_score)  # type: ignore[union-attr]
    best = out / "checkpoints" / "best.ckpt"
    test = build_cli(["test", *common, "--ckpt_path", str(best), *QUIET])
    m = test.trainer.callback_metrics
    stats_path = out / "queries" / "stats.json"
    result = {
        "job": name,
        "method": method,
        "responses": resp,
        "budget": budget,
        "seed": seed,
        "val_acc1": val,
        "test_acc1": float(m["test/acc1"]),
        "fit_s": fit_s,
        "queries": json.loads(stats_path.read_text()) if stats_path.is_file() else None,
    }
    done.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


def schedule(args: argparse.Namespace) -> None:
    todo = args.jobs or jobs(args.budgets, args.seeds, max(args.budgets))
    running: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    while todo or running:
        for name, p in list(running.items()):
            if p.poll() is not None:
                print(f"{time.strftime('%H:%M:%S')} {name} exit {p.returncode}", flush=True)
                if p.returncode:
                    failed.add(name)
                del running[name]
        for name in list(todo):
            if len(running) >= args.workers:
                break
            if name.startswith("mekd"):
                gan = f"gan_{name.split('_')[1]}"
                if gan in failed:
                    todo.remove(name)
                    continue
                if not (out / gan / "result.json").is_file():
                    continue
            todo.remove(name)
            if (out / name / "result.json").is_file():
                continue
            log = open(out / f"{name}.log", "w")  # noqa: SIM115
            cmd = [sys.executable, "-m", "benchmarks.mekd_fashion_mnist", "--job", name, "--out", args.out]
            cmd += ["--teacher", args.teacher]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--gan-steps", str(args.gan_steps)]
            cmd += ["--im-interval", str(args.im_interval), "--im-batch", str(args.im_batch), "--ema", str(args.ema)]
            running[name] = subprocess.Popen([*cmd, "--root", args.root], stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{time.strftime('%H:%M:%S')} start {name}", flush=True)
        time.sleep(2)


def report(args: argparse.Namespace) -> None:
    import statistics

    results = [json.loads(p.read_text()) for p in Path(args.out).glob("*/result.json")]
    students = [r for r in results if "test_acc1" in r]
    gans = {r["job"]: r for r in results if r["job"].startswith("gan_")}
    groups: dict[tuple, list[dict]] = {}
    for r in students:
        groups.setdefault((r["method"], r["responses"], r["budget"]), []).append(r)
    lines = ["| method | answers | budget | seeds | test top-1 (%) | val top-1 (%) | up (MB) | down (kB) | fit min |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (m, resp, b), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        accs = [100 * r["test_acc1"] for r in rs]
        vals = [100 * r["val_acc1"] for r in rs]

        def ms(v: list[float]) -> str:
            return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

        q = rs[0].get("queries") or {}
        up, down = q.get("journal_bytes_up", 0), q.get("journal_bytes_down", 0)
        if m.startswith("mekd"):
            g = gans[f"gan_{resp}"]["queries"]
            up, down = up + g["journal_bytes_up"], down + g["journal_bytes_down"]
        fit = statistics.mean(r["fit_s"] for r in rs) / 60
        lines.append(
            f"| {m} | {resp} | {b} | {','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
            f"{ms(accs)} | {ms(vals)} | {up / 1e6:.2f} | {down / 1e3:.1f} | {fit:.1f} |"
        )
    for name, g in sorted(gans.items()):
        q = g["queries"]
        lines.append(
            f"\n{name}: {q['journal_spent']} queries, {q['journal_bytes_up'] / 1e6:.2f} MB up, "
            f"{q['journal_bytes_down'] / 1e3:.1f} kB down, {g['fit_s'] / 60:.1f} min"
        )
    text = "\n".join(lines)
    print(text)
    if args.report:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for (m, resp), style in {
            ("mekd", "soft"): "o-",
            ("mekd", "hard"): "s-",
            ("mekdtau2", "soft"): "^-",
            ("mekdtau2", "hard"): "v-",
            ("kd", "soft"): "o--",
            ("kd", "hard"): "s--",
        }.items():
            pts = sorted(
                (b, [100 * r["test_acc1"] for r in rs]) for (mm, rr, b), rs in groups.items() if (mm, rr) == (m, resp)
            )
            if not pts:
                continue
            xs = [b / 1000 for b, _ in pts]
            ys = [statistics.mean(v) for _, v in pts]
            es = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
            name = {"mekdtau2": "MEKD, KL x tau^2"}.get(m, m.upper())
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{name} ({resp})")
        refs = [100 * r["test_acc1"] for (m, _, _), rs in groups.items() if m == "ref" for r in rs]
        if refs:
            ax.axhline(statistics.mean(refs), color="grey", ls=":", label="true labels (reference)")
        ax.set_xlabel("query budget (thousand images, deprivatization included)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title("Fashion-MNIST: resnet8 teacher (black box) -> tinynet, 250 steps", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.report, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="runs/mekd/fashion_mnist/teacher/checkpoints/best.ckpt")
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="runs/mekd/fashion_mnist/evidence")
    p.add_argument("--budgets", type=int, nargs="+", default=[10_000, 30_000, 50_000])
    p.add_argument("--steps", type=int, default=400, help="training steps of every student")
    p.add_argument("--batch", type=int, default=128, help="batch size of every student")
    p.add_argument("--gan-steps", type=int, default=800, help="generator steps of the deprivatization stage")
    p.add_argument("--im-interval", type=int, default=25, help="query every this many generator steps")
    p.add_argument("--im-batch", type=int, default=48, help="images queried per L_IM step")
    p.add_argument(
        "--ema", type=float, default=0.999, help="EMA decay of the generator (averaging from 1/4 of the steps)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--job", default=None, help="run one job (used by the scheduler)")
    p.add_argument("--jobs", nargs="+", default=None, help="schedule these jobs instead of the default list")
    p.add_argument("--report", default=None, help="write the budget curve PNG here (with --summary)")
    p.add_argument("--summary", action="store_true", help="print the table of finished runs")
    args = p.parse_args()
    if args.job:
        run_job(args.job, args)
    elif args.summary or args.report:
        report(args)
    else:
        schedule(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
