"""Evidence for cGAN-KD on Fashion-MNIST: Table 2, Fig. 9 and M^g analogs, from the shipped pipeline.

The shared stages (teacher, class-conditional GAN, DR model, sample store) and the four Table 2 students
(NOKD, BLKD, cGAN-KD, cGAN-KD + BLKD) are stages of ``recipes/cgankd/fashion_mnist/pipeline.yaml``, run
here one stage at a time with ``kdl pipeline --only STAGE --vars.seed K`` so that two can run side by
side (the pipeline's records make each one skip when it is already done). The ablations reuse the same
store and recipes with one change each:

- ``real_only``: the cGAN-KD student with no fake image (``max_fake 0``): fine-tuned from NOKD for the
  same 15 epochs on D^r alone. It is M^g = 0 of the M^g curve, and the control for the extra epochs
  that every fine-tuned student gets.
- ``mg<N>``: at most N fake images (a seeded subset of the store).
- ``no_filter``: every sample the subsampling accepted, none dropped by the teacher (no M2).
- ``no_subsample``: a second store generated without cDR-RS (no M1), filtered as the main one.

``--setting rotated`` runs the regression pipeline (``recipes/cgankd/rotated``: the rotation angle of
Fashion-MNIST images, CcGAN, global filter, label replacement): Table 5's NOKD, FitNet, cGAN-KD and
cGAN-KD + FitNet, and the ablations ``no_replace`` (the CcGAN's assigned labels kept), ``no_filter`` and
``no_subsample``.

Every student folder is ``<out>/<variant>/seed<k>``; ``kdl report <out>/*/seed* --group-by parent``
builds the table. Finished jobs are skipped when the script is run again (``<out>/logs/<job>.done``).

    python -m benchmarks.cgankd_fashion_mnist --out runs/evidence/cgankd_fmnist
    python -m benchmarks.cgankd_fashion_mnist --setting rotated --out runs/evidence/cgankd_rotated
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import QUIET, REPO

SETTING = "fashion_mnist"  # or "rotated" (--setting): the recipes/cgankd/<setting> folder


def recipes() -> Path:
    return REPO / "recipes" / "cgankd" / SETTING


@dataclass
class Job:
    name: str
    cmds: list[list[str]]
    deps: list[str] = field(default_factory=list)
    threads: int = 1
    priority: int = 0  # higher first among ready jobs (the GAN's critical path)


def kdl() -> list[str]:
    return [sys.executable, "-m", "kd_lightning.commands"]


def stage(out: str, name: str, seed: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        *kdl(),
        "pipeline",
        "--config",
        f"recipes/cgankd/{SETTING}/pipeline.yaml",
        "--vars.root",
        out,
        "--vars.seed",
        str(seed),
        "--only",
        name,
        *extra,
    ]


def fit_and_test(out: str, variant: str, seed: int, recipe: str, args: list[str]) -> list[list[str]]:
    run = f"{out}/{variant}/seed{seed}"
    common = ["--config", str(recipes() / recipe), "--seed_everything", str(seed), *args]
    fit = [*kdl(), "fit", *common, "--trainer.default_root_dir", run, *QUIET]
    test = [*kdl(), "test", *common, "--trainer.default_root_dir", run, "--ckpt_path", f"{run}/checkpoints/best.ckpt"]
    return [fit, [*test, "--trainer.enable_progress_bar", "false"]]


def generate_no_subsample(out: str, gan_dir: str) -> list[list[str]]:
    """``kdl generate`` of a second store without cDR-RS (M1 off), filtered like the main one."""
    return [
        [
            *kdl(),
            "generate",
            "--config",
            str(recipes() / "generate.yaml"),
            "--generator",
            f"{out}/{gan_dir}/checkpoints/last.ckpt",
            "--density_ratio",
            f"{out}/dr/checkpoints/best.ckpt",
            "--teacher",
            f"{out}/teacher/checkpoints/best.ckpt",
            "--subsample",
            "false",
            "--out",
            f"{out}/store_no_subsample",
        ],
    ]


def jobs(out: str, seeds: list[int], mg: list[int]) -> list[Job]:
    store = f"{out}/store"
    js = [
        Job("teacher", [stage(out, "teacher")], priority=2),
        Job("cgan", [stage(out, "cgan")], priority=3),
        Job("dr", [stage(out, "dr")], ["teacher", "cgan"], priority=3),
        Job("generate", [stage(out, "generate")], ["dr"], priority=3),
        Job(
            "generate_no_subsample",
            generate_no_subsample(out, "cgan"),
            ["dr"],
        ),
    ]
    for k in seeds:
        nokd = f"{out}/nokd/seed{k}/checkpoints/best.ckpt"
        js += [
            Job(
                f"nokd{k}",
                [stage(out, "student", k), stage(out, "test_student", k)],
                ["teacher"] if k else [],
                priority=1,
            ),
            Job(f"blkd{k}", [stage(out, "blkd", k), stage(out, "test_blkd", k)], ["teacher"]),
            Job(
                f"cgankd{k}",
                [stage(out, "student_cgankd", k), stage(out, "test_cgankd", k)],
                ["generate", f"nokd{k}"],
                priority=1,
            ),
            Job(
                f"cgankd_blkd{k}",
                [stage(out, "student_cgankd_blkd", k), stage(out, "test_cgankd_blkd", k)],
                ["generate", f"nokd{k}"],
                priority=1,
            ),
        ]
        base = ["--model.init_args.net_weights", nokd, "--data.init_args.store", store]
        js.append(
            Job(
                f"real_only{k}",
                fit_and_test(out, "real_only", k, "student_cgankd.yaml", [*base, "--data.init_args.max_fake", "0"]),
                ["generate", f"nokd{k}"],
            )
        )
        js.append(
            Job(
                f"no_filter{k}",
                fit_and_test(out, "no_filter", k, "student_cgankd.yaml", [*base, "--data.init_args.filtered", "false"]),
                ["generate", f"nokd{k}"],
            )
        )
        nosub = ["--model.init_args.net_weights", nokd, "--data.init_args.store", f"{out}/store_no_subsample"]
        js.append(
            Job(
                f"no_subsample{k}",
                fit_and_test(out, "no_subsample", k, "student_cgankd.yaml", nosub),
                ["generate_no_subsample", f"nokd{k}"],
            )
        )
        for n in mg:
            js.append(
                Job(
                    f"mg{n}_{k}",
                    fit_and_test(out, f"mg{n}", k, "student_cgankd.yaml", [*base, "--data.init_args.max_fake", str(n)]),
                    ["generate", f"nokd{k}"],
                    priority=-1,  # after every seed of Table 2 and Fig. 9
                )
            )
    return js


def jobs_rotated(out: str, seeds: list[int]) -> list[Job]:
    """Table 5 (NOKD, FitNet, cGAN-KD, cGAN-KD + FitNet) and Fig. 9 for regression on rotated Fashion-MNIST."""
    js = [
        Job("teacher", [stage(out, "teacher")], priority=2),
        Job("cgan", [stage(out, "cgan")], priority=3),
        Job("dr", [stage(out, "dr")], ["teacher", "cgan"], priority=3),
        Job("generate", [stage(out, "generate")], ["dr"], priority=3),
        Job(
            "generate_no_subsample",
            generate_no_subsample(out, "ccgan"),
            ["dr"],
            priority=-1,
        ),
    ]
    for k in seeds:
        nokd = f"{out}/nokd/seed{k}/checkpoints/best.ckpt"
        js += [
            Job(f"nokd{k}", [stage(out, "student", k), stage(out, "test_student", k)], priority=1),
            Job(f"fitnet{k}", [stage(out, "fitnet", k), stage(out, "test_fitnet", k)], ["teacher"]),
            Job(
                f"cgankd{k}",
                [stage(out, "student_cgankd", k), stage(out, "test_cgankd", k)],
                ["generate", f"nokd{k}"],
                priority=1,
            ),
            Job(
                f"cgankd_fitnet{k}",
                [stage(out, "student_cgankd_fitnet", k), stage(out, "test_cgankd_fitnet", k)],
                ["generate", f"nokd{k}"],
                priority=1,
            ),
        ]
        base = ["--model.init_args.net_weights", nokd, "--data.init_args.store", f"{out}/store"]
        for variant, extra in (
            ("no_replace", ["--data.init_args.replaced", "false"]),
            ("no_filter", ["--data.init_args.filtered", "false"]),
        ):
            js.append(
                Job(
                    f"{variant}{k}",
                    fit_and_test(out, variant, k, "student_cgankd.yaml", [*base, *extra]),
                    ["generate", f"nokd{k}"],
                    priority=-1,
                )
            )
        nosub = ["--model.init_args.net_weights", nokd, "--data.init_args.store", f"{out}/store_no_subsample"]
        js.append(
            Job(
                f"no_subsample{k}",
                fit_and_test(out, "no_subsample", k, "student_cgankd.yaml", nosub),
                ["generate_no_subsample", f"nokd{k}"],
                priority=-2,
            )
        )
    return js


def plot_mg(out: str, mg: list[int], n_store: int, path: str) -> None:
    """Test error against M^g (0 = real_only, the given points, the whole store), mean ± std over seeds."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kd_lightning.report import read_run

    def test_errors(folder: Path) -> list[float]:  # finished (tested) seeds only
        runs = [read_run(p) for p in sorted(folder.glob("seed*"))]
        return [100 * (1 - r.test["test/acc1"]) for r in runs if "test/acc1" in r.test]

    points = [(0, "real_only"), *((n, f"mg{n}") for n in mg), (n_store, "cgankd")]
    xs, means, stds = [], [], []
    for n, variant in points:
        errs = test_errors(Path(out, variant))
        if errs:
            xs.append(n)
            means.append(statistics.mean(errs))
            stds.append(statistics.stdev(errs) if len(errs) > 1 else 0.0)
    nokd = test_errors(Path(out, "nokd"))
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label="cGAN-KD (fine-tuned from NOKD)")
    if nokd:
        ax.axhline(statistics.mean(nokd), color="gray", ls="--", lw=1, label="NOKD")
    ax.set_xlabel("M^g: fake images used (of the filtered store)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Fashion-MNIST, 5,000 real images, resnet8", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/evidence/cgankd_fmnist")
    p.add_argument(
        "--setting",
        choices=["fashion_mnist", "rotated"],
        default="fashion_mnist",
        help="classification (Table 2) or the rotation-angle regression (Table 5)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mg", type=int, nargs="*", default=[1000], help="M^g points besides 0 and the whole store")
    p.add_argument("--workers", type=int, default=2, help="jobs run side by side")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these jobs; one whose dependency is left out waits for that job's <out>/logs/<job>.done "
        "(written by another run of this script, or by hand)",
    )
    p.add_argument(
        "--running",
        nargs="*",
        default=[],
        metavar="JOB=PID",
        help="jobs already running in another process (e.g. after this script was stopped): wait for them",
    )
    p.add_argument("--plot", default=None, help="write the M^g curve to this PNG (from finished runs) and stop")
    p.add_argument("--store-size", type=int, default=2700, help="kept samples in the store (the last M^g point)")
    args = p.parse_args()
    global SETTING
    SETTING = args.setting
    out = os.path.abspath(args.out)
    if args.plot:
        plot_mg(out, args.mg, args.store_size, args.plot)
        return 0
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    every = jobs_rotated(out, args.seeds) if SETTING == "rotated" else jobs(out, args.seeds, args.mg)
    for spec in args.running:  # a job already running elsewhere: its slot waits for that process to end
        name, pid = spec.split("=")
        for job in every:
            if job.name == name:
                job.cmds = [["bash", "-c", f"while kill -0 {int(pid)} 2>/dev/null; do sleep 10; done"]]
    todo = {j.name: j for j in every if args.only is None or j.name in args.only}
    done = {j for j in todo if (logs / f"{j}.done").exists()}
    running: dict[str, tuple[subprocess.Popen, int, float]] = {}  # name -> (process, command index, start)
    failed: list[str] = []
    start = time.time()

    def launch(job: Job, i: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "PYTHONPATH": str(REPO)}
        log = open(logs / f"{job.name}.log", "a")  # noqa: SIM115 - closed with the process
        log.write(f"\n$ {' '.join(job.cmds[i])}\n")
        log.flush()
        proc = subprocess.Popen(job.cmds[i], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        running[job.name] = (proc, i, running.get(job.name, (None, 0, time.time()))[2])

    while True:
        for name, (proc, i, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            job = todo[name]
            if rc != 0:
                print(
                    f"[{time.time() - start:7.0f}s] FAILED {name} (exit {rc}); log {logs / (name + '.log')}", flush=True
                )
                failed.append(name)
                del running[name]
            elif i + 1 < len(job.cmds):
                launch(job, i + 1)
            else:
                (logs / f"{name}.done").write_text(f"{time.time() - t0:.1f}\n")
                print(f"[{time.time() - start:7.0f}s] done {name} in {(time.time() - t0) / 60:.1f} min", flush=True)
                done.add(name)
                del running[name]
        blocked = set(failed)
        ready = [
            j
            for n, j in todo.items()
            if n not in done
            and n not in running
            and n not in blocked
            and all(d in done or (d not in todo and (logs / f"{d}.done").exists()) for d in j.deps)
        ]
        ready.sort(key=lambda j: -j.priority)
        while ready and len(running) < args.workers:
            job = ready.pop(0)
            running[job.name] = (None, 0, time.time())  # type: ignore[assignment]
            launch(job, 0)
            print(f"[{time.time() - start:7.0f}s] start {job.name}", flush=True)
        if not running:
            break
        time.sleep(5)
    left = sorted(set(todo) - done)
    print(f"finished in {(time.time() - start) / 60:.1f} min; failed: {failed or 'none'}; not run: {left or 'none'}")
    return 1 if failed or left else 0


if __name__ == "__main__":
    raise SystemExit(main())
