"""Evidence for the 16 white-box distillers cGAN-KD compares with, against NOKD (the student alone).

Every run goes through ``kdl`` with the shipped recipes (``recipes/fashion_mnist/<method>.yaml``),
overriding only the budget: a stratified training subset, few epochs, no augmentation and the teacher's
outputs cached (``cache_teacher``) so the teacher runs once per sample. Each run's checkpoint is chosen on
the validation split (carved from the training set) and then tested once on the held-out test split.
Finished runs are kept (``<out>/<method>/seed<k>/result.json``) and skipped when the script is run again.
FT, AB and TAKD first run their earlier stage (``PRE_STAGES``: paraphraser, AB initialisation, teacher
assistant) into ``<out>/<method>/seed<k>/pre``; its time is included in ``fit min / run``.

    python -m benchmarks.distill_fashion_mnist --teacher runs/fashion_mnist/teacher/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import QUIET, REPO, quiet_lightning
from kd_lightning.cli import build_cli, cpu_defaults

METHODS = {
    "NOKD": "student.yaml",
    "BLKD": "blkd.yaml",
    "FitNet": "fitnet.yaml",
    "AT": "at.yaml",
    "PKT": "pkt.yaml",
    "SP": "sp.yaml",
    "VID": "vid.yaml",
    "RKD": "rkd.yaml",
    "CRD": "crd.yaml",
    "SSKD": "sskd.yaml",
    "DKD": "dkd.yaml",
    "FT": "ft.yaml",
    "AB": "ab.yaml",
    "TAKD": "takd.yaml",
    "ReviewKD": "reviewkd.yaml",
    "SemCKD": "semckd.yaml",
    "SimKD": "simkd.yaml",
}
#: the table's columns (``kdl report --metrics``)
METRICS = "val/acc1,test/acc1,test/f1,test/ece"
#: method -> (recipe of its earlier stage, epochs of that stage (None: --epochs), which checkpoint it hands on)
PRE_STAGES = {
    "FT": ("ft_paraphraser.yaml", 1, "last"),  # RepDistiller: 30 of 240 epochs, i.e. 1/8
    "AB": ("ab_init.yaml", 1, "last"),
    "TAKD": ("takd_assistant.yaml", None, "best"),
}


def recipe_of(name: str) -> Path:
    return REPO / "recipes" / "fashion_mnist" / name


def model_class(recipe: Path) -> str:
    import yaml

    return str(yaml.safe_load(recipe.read_text())["model"]["class_path"]).rsplit(".", 1)[-1]


def pre_stage(method: str, seed: int, args: argparse.Namespace) -> tuple[list[str], float]:
    """Run ``method``'s earlier stage (once) and return the arguments that hand its checkpoint on."""
    name, epochs, which = PRE_STAGES[method]
    recipe, out = recipe_of(name), Path(args.out) / method / f"seed{seed}" / "pre"
    epochs = epochs or args.epochs
    ckpt = out / "checkpoints" / f"{which}.ckpt"
    timing = out / "fit_s.json"
    if not timing.is_file():
        cls = model_class(recipe)
        extra = ["--model.init_args.teacher", args.teacher]
        if cls == "DistillModule":
            net = args.assistant if method == "TAKD" else args.student
            extra += ["--model.init_args.net", net, "--model.init_args.cache_teacher", "true"]
        t0 = time.perf_counter()
        build_cli(["fit", *data_args(recipe, seed, out, args), *extra, *quiet(epochs)])
        timing.write_text(json.dumps(time.perf_counter() - t0))
    fit_s = float(json.loads(timing.read_text()))
    if method == "FT":
        import yaml

        loss = yaml.safe_load(recipe_of(METHODS[method]).read_text())["model"]["init_args"]["kd_losses"][0]
        loss["init_args"]["paraphraser"] = str(ckpt)
        return ["--model.init_args.kd_losses", json.dumps([loss])], fit_s
    if method == "AB":
        return ["--model.init_args.net_weights", str(ckpt)], fit_s
    return ["--model.init_args.teacher", str(ckpt), "--model.init_args.cache_teacher", "true"], fit_s


def data_args(recipe: Path, seed: int, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        "--config",
        str(recipe),
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(out),
        "--data.init_args.root",
        args.root,
        "--data.init_args.train_size",
        str(args.train_size),
        "--data.init_args.augment",
        "false",
    ]


def quiet(epochs: int) -> list[str]:
    return [
        "--trainer.max_epochs",
        str(epochs),
        *QUIET,
        "--model.init_args.lr_scheduler.init_args.T_max",
        str(epochs),
    ]


def run(method: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / method / f"seed{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = recipe_of(METHODS[method])
    pre, pre_s = pre_stage(method, seed, args) if method in PRE_STAGES else ([], 0.0)
    common = [*data_args(recipe, seed, out, args), "--model.init_args.net", args.student]
    if pre:
        common += pre
    if model_class(recipe) == "DistillModule" and method != "TAKD":
        common += ["--model.init_args.teacher", args.teacher, "--model.init_args.cache_teacher", "true"]
    fit = [
        "fit",
        *common,
        "--trainer.max_epochs",
        str(args.epochs),
        *QUIET,
        "--model.init_args.lr_scheduler.init_args.T_max",
        str(args.epochs),
    ]
    t0 = time.perf_counter()
    cli = build_cli(fit)
    fit_s = time.perf_counter() - t0 + pre_s
    best = out / "checkpoints" / "best.ckpt"
    val = float(cli.trainer.checkpoint_callback.best_model_score)  # type: ignore[union-attr]
    test = build_cli(["test", *common, "--ckpt_path", str(best), "--trainer.enable_progress_bar", "false"])
    m = test.trainer.callback_metrics
    result = {
        "method": method,
        "seed": seed,
        "val_acc1": val,
        "test_acc1": float(m["test/acc1"]),
        "test_f1": float(m["test/f1"]),
        "test_ece": float(m["test/ece"]),
        "fit_s": fit_s,
    }
    done.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


def write_table(results: list[dict], args: argparse.Namespace) -> None:
    """Write ``<out>/table.md`` by ``kdl report`` over the run folders (one group per method), plus the fit minutes."""
    from kd_lightning.report import main as report

    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    runs = [str(Path(args.out) / m / f"seed{s}") for m in methods for s in args.seeds]
    title = (
        f"Fashion-MNIST, teacher {args.teacher_name} -> student {args.student}, {args.train_size} training images "
        f"(stratified subset; 10% of the training set held out for validation), {args.epochs} epochs, batch 128, "
        f"no augmentation, seeds {', '.join(map(str, args.seeds))}; mean ± std over seeds; checkpoint chosen on "
        "validation top-1, then tested once on the 10k test images."
    )
    out = Path(args.out) / "table.md"
    argv = [*runs, "--group-by", "parent", "--metrics", METRICS, "--title", title, "--out", str(out), "--quiet", "true"]
    if report(argv) != 0:
        raise SystemExit(f"kdl report failed on {args.out}")
    minutes = ", ".join(
        f"{m} {statistics.mean(r['fit_s'] for r in results if r['method'] == m) / 60:.1f}" for m in methods
    )
    line = f"fit minutes per run (mean over seeds, earlier stage included): {minutes}"
    print("\n" + line)
    with out.open("a") as f:
        f.write(f"\n{line}\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="kdl checkpoint of the teacher")
    p.add_argument("--teacher-name", default="resnet56")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--assistant", default="resnet20", help="TAKD's teacher assistant")
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default="runs/evidence/distill")
    args = p.parse_args()
    quiet_lightning()
    cpu_defaults()
    results = [run(m, s, args) for s in args.seeds for m in args.methods]
    write_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
