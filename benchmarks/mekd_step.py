"""MEKD's Fashion-MNIST pipeline, one step at a time: where each stage's milliseconds go, kdl against a plain loop.

The settings are recipes/mekd/fashion_mnist/pipeline.yaml's: the official 128/128/64-channel generator, tinynet
students in batches of 128, lr 0.05, validation on the 2,000 labelled edge images, a resnet8 teacher answered
in-process (:class:`~kd_lightning.teachers.LocalTeacher`; ``--http`` adds the paid query over a real
``kdl serve-teacher``). The teacher and the generator are trained for a few steps only (the cost of a step does
not depend on how well they are trained).

Stage 2 (arms ``mekd_soft`` (KL x tau^2), ``mekd_hard``, ``kd_gz``, ``kd_soft``): after one untimed epoch over a
small latent or local pool (the paid queries: in the pipeline, the first ~54 of 2,500 steps), ``--steps`` steps
are timed, with the pool cache (:class:`~kd_lightning.methods.blackbox_student.PoolCache`, the default) and,
for the generator arms, without it (the old path), both through ``kdl``'s CLI and Lightning's Trainer; and the
same step in a plain PyTorch loop (the module's own methods, ``torch.optim.SGD``, no Lightning). Scenarios
alternate within every repeat; medians over repeats are reported. Each moment of a timed step is charged to the
innermost named part running; parts are in thread CPU ms (``time.thread_time``: steadier than wall time on a
loaded machine), whole steps in CPU and wall ms. Validation (and the checkpoint written after it) is timed apart
and shown per run of it and amortised over the pipeline's ``val_every`` steps.

Stage 1 (``deprivatize``): one D + G update of the official DCGAN at batch 64 with L_IM on the whole batch at
every generator step (``im_interval`` 1, so the query's cost is visible; the pipeline queries every 100th step),
kdl against a plain loop of the same update (Adam, EMA, the discriminator frozen during the G update as
Lightning's ``toggled_optimizer`` does).

    python -m benchmarks.mekd_step                   # ~10 min on an idle core
    python -m benchmarks.mekd_step --repeats 3 --http --out docs/results/mekd_step.md

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.common import QUIET, REPO, quiet_lightning
from kd_lightning.cli import build_cli

RECIPES = REPO / "recipes" / "mekd" / "fashion_mnist"
ARMS = {  # arm: (recipe, extra kdl arguments, queries G(z))
    "mekd_soft": ("mekd_soft.yaml", ["--model.init_args.kl_scale", "tau2"], True),
    "mekd_hard": ("mekd_hard.yaml", ["--model.init_args.kl_scale", "tau2"], True),
    "kd_gz": ("kd_gz.yaml", [], True),
    "kd_soft": ("kd_soft.yaml", [], False),
}
#: (label, rule): a moment goes to the first rule whose last name is the innermost open part and whose other
#: names are open around it (outermost first)
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("G(z): query images", ("query_images",)),
    ("wire round trip (prepare)", ("prepare",)),
    ("teacher answers (in-process model / HTTP)", ("post",)),
    ("journal append (write + fsync)", ("append",)),
    ("teacher query: hash, lock, journal lookup", ("query",)),
    ("G(T/tau): teacher side (no grad)", ("teacher_image",)),
    ("student forward", ("net",)),
    ("distill loss incl. G(S/tau) forward", ("distill_loss",)),
    ("backward (student, through G)", ("backward",)),
    ("SGD step", ("sgd",)),
    ("stage 1: G forward", ("generator",)),
    ("stage 1: D forward", ("discriminator",)),
    ("stage 1: Adam steps", ("adam",)),
    ("stage 1: EMA update", ("ema",)),
    ("training_step rest (logging, loss sum)", ("training_step",)),
    ("epoch end: queries/stats.json", ("write_stats",)),
    ("validation (every val_every steps)", ("validation",)),
    ("checkpoint (after validation)", ("checkpoint",)),
    ("Lightning loop, data, callbacks", ()),
)


class PartClock:
    """Charges wall and thread CPU time to the path of open wrappers (outermost first) while active."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.cpu: dict[tuple[str, ...], float] = defaultdict(float)
        self.active = False
        self.t = time.thread_time()

    def tick(self) -> None:
        now = time.thread_time()
        if self.active:
            self.cpu[tuple(self.stack)] += now - self.t
        self.t = now

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            self.stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.tick()
                self.stack.pop()

        return timed

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.tick()
        self.stack.append(name)
        try:
            yield
        finally:
            self.tick()
            self.stack.pop()

    def parts(self) -> dict[str, float]:
        """Total CPU seconds of every part in :data:`PARTS`."""
        out: dict[str, float] = defaultdict(float)
        for path, seconds in self.cpu.items():
            outer = next((n for n in ("validation", "checkpoint") if n in path), None)
            if outer:  # everything inside a validation or a checkpoint belongs to it
                path = (outer,)
            for label, rule in PARTS:
                if (rule == () and path == ()) or (rule and path and path[-1] == rule[-1]):
                    out[label] += seconds
                    break
            else:
                out["other: " + "/".join(path)] += seconds
        return dict(out)


def instrument(clock: PartClock, m: Any, client: Any, optimizers: list[torch.optim.Optimizer]) -> None:
    """Wrap the module's parts, its teacher client's and its optimisers' ``step`` with ``clock``."""
    for attr, name in (
        ("query_images", "query_images"),
        ("_teacher_image", "teacher_image"),
        ("distill_loss", "distill_loss"),
        ("training_step", "training_step"),
        ("backward", "backward"),
        ("manual_backward", "backward"),
        ("update_ema", "ema"),
    ):
        if hasattr(m, attr):
            setattr(m, attr, clock.wrap(name, getattr(m, attr)))
    for attr, name in (("net", "net"), ("discriminator", "discriminator")):
        if hasattr(m, attr):
            mod = getattr(m, attr)
            mod.forward = clock.wrap(name, mod.forward)
    if hasattr(m, "generator") and not hasattr(m, "distill_loss"):  # stage 1 (stage 2's G is inside its parts)
        m.generator.forward = clock.wrap("generator", m.generator.forward)
    if hasattr(m, "link"):
        m.link.write_stats = clock.wrap("write_stats", m.link.write_stats)
    if client is not None:
        client.prepare = clock.wrap("prepare", client.prepare)
        client.query = clock.wrap("query", client.query)
        client._post = clock.wrap("post", client._post)
        client.open()
        if client._journal is not None:
            client._journal._append = clock.wrap("append", client._journal._append)
    for opt in optimizers:
        opt.step = clock.wrap("adam" if isinstance(opt, torch.optim.Adam) else "sgd", opt.step)  # type: ignore[method-assign]


class Timed(L.Callback):
    """Instruments the module at train start; times steps ``warmup`` .. ``warmup + steps - 1`` (CPU and wall)."""

    def __init__(self, clock: PartClock, warmup: int, steps: int) -> None:
        self.clock, self.warmup, self.steps = clock, warmup, steps
        self.cpu = self.wall = 0.0
        self.validations = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        c = self.clock
        instrument(c, pl_module, getattr(getattr(pl_module, "link", None), "client", None), trainer.optimizers)
        val = trainer.fit_loop.epoch_loop.val_loop
        val.run = c.wrap("validation", val.run)  # type: ignore[method-assign]
        trainer.save_checkpoint = c.wrap("checkpoint", trainer.save_checkpoint)  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup * (2 if _gan(pl_module) else 1):  # a GAN's step counts D and G
            self.clock.tick()
            self.clock.active = True
            self._cpu, self._wall = time.thread_time(), time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validations += self.clock.active

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.tick()
        self.clock.active = False
        self.cpu, self.wall = time.thread_time() - self._cpu, time.perf_counter() - self._wall


def _gan(m: Any) -> bool:
    return hasattr(m, "g_steps")


# ------------------------------------------------------------------------------------------------ stage 2
def kdl_argv(arm: str, args: argparse.Namespace, tmp: str, root: str, steps: int) -> list[str]:
    recipe, extra, gz = ARMS[arm]
    argv = ["--config", str(RECIPES / recipe), "--trainer.default_root_dir", root, *QUIET, "--trainer.logger", "false"]
    argv += ["--model.init_args.teacher", f"{tmp}/teacher/checkpoints/last.ckpt", "--seed_everything", "0"]
    argv += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(args.val_at)]
    argv += ["--trainer.accelerator", "cpu", "--data.init_args.pool_size", str(args.pool)]
    argv += ["--model.init_args.query_budget", str(args.pool), "--model.init_args.optimizer.init_args.lr", "0.05"]
    argv += ["--data.init_args.batch_size", str(args.batch), *extra]
    if gz:
        argv += ["--model.init_args.generator", f"{tmp}/gan/checkpoints/last.ckpt"]
    return argv


def run_kdl(arm: str, args: argparse.Namespace, tmp: str, tag: str, cache: bool) -> dict[str, Any]:
    warmup = args.pool // args.batch  # one epoch: every query paid
    clock = PartClock()
    timed = Timed(clock, warmup, args.steps)
    cli = build_cli(kdl_argv(arm, args, tmp, f"{tmp}/{tag}", warmup + args.steps), run=False)
    cli.model.pool_cache = cache
    cli.trainer.callbacks.append(timed)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return summarise(clock, timed.cpu, timed.wall, args.steps, timed.validations)


def run_plain(arm: str, args: argparse.Namespace, tmp: str, tag: str) -> dict[str, Any]:
    """The same training step (the module's own methods) in a hand-written loop: no Lightning, no validation."""
    from kd_lightning.teachers import connect_teacher

    warmup = args.pool // args.batch
    cli = build_cli(kdl_argv(arm, args, tmp, f"{tmp}/{tag}", 1), run=False)
    m, dm = cli.model, cli.datamodule
    dm.setup("fit")
    hp = m.hparams
    client = connect_teacher(
        hp.teacher, responses=hp.responses, query_budget=hp.query_budget, journal=f"{tmp}/{tag}.bin"
    )
    m.link.client = client
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    clock = PartClock()
    instrument(clock, m, client, [opt])
    m.train()
    done, cpu0, wall0 = 0, 0.0, 0.0
    while done < warmup + args.steps:
        for batch in dm.train_dataloader():
            if done == warmup:
                clock.tick()
                clock.active = True
                cpu0, wall0 = time.thread_time(), time.perf_counter()
            if done == warmup + args.steps:
                break
            with clock.part("training_step"):
                cached = m.pool_cached(batch)
                if cached:
                    x = m.query_cache.get(batch["index"], lambda b=batch: client.prepare(m.query_images(b).detach()))
                else:
                    x = client.prepare(m.query_images(batch).detach())
                answers = client.query(x)
                m.pool_index = batch["index"] if cached else None
                loss = sum(m.distill_loss(x, m(x), answers).values())
                m.pool_index = None
            opt.zero_grad(set_to_none=True)
            with clock.part("backward"):
                loss.backward()
            opt.step()
            done += 1
    clock.tick()
    clock.active = False
    out = summarise(clock, time.thread_time() - cpu0, time.perf_counter() - wall0, args.steps, 0)
    client.close()
    return out


def summarise(clock: PartClock, cpu: float, wall: float, steps: int, validations: int) -> dict[str, Any]:
    parts = clock.parts()
    val = parts.pop("validation (every val_every steps)", 0.0) + parts.pop("checkpoint (after validation)", 0.0)
    step_cpu = cpu - val  # a training step without the validation that ran inside the window
    return {
        "parts": {k: 1000 * v / steps for k, v in parts.items()},
        "step_cpu": 1000 * step_cpu / steps,
        "step_wall": 1000 * wall * (step_cpu / cpu if cpu else 1) / steps,
        "val_cpu": 1000 * val / validations if validations else 0.0,
    }


# ------------------------------------------------------------------------------------------------ stage 1
def gan_argv(args: argparse.Namespace, tmp: str, root: str, steps: int, teacher: str) -> list[str]:
    argv = ["--config", str(RECIPES / "deprivatize.yaml"), "--trainer.default_root_dir", root, *QUIET]
    argv += ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps)]
    argv += ["--model.init_args.teacher", teacher, "--model.init_args.im_interval", "1", "--seed_everything", "0"]
    return argv


def run_gan_kdl(args: argparse.Namespace, tmp: str, tag: str) -> dict[str, Any]:
    clock = PartClock()
    warmup = 2
    timed = Timed(clock, warmup, args.steps)
    teacher = f"{tmp}/teacher/checkpoints/last.ckpt"
    cli = build_cli(gan_argv(args, tmp, f"{tmp}/{tag}", 2 * (warmup + args.steps), teacher), run=False)
    cli.trainer.callbacks.append(timed)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return summarise(clock, timed.cpu, timed.wall, args.steps, 0)


def run_gan_plain(args: argparse.Namespace, tmp: str, tag: str) -> dict[str, Any]:
    """One D update and one G update (with L_IM on the whole batch) and the EMA, as GANTask.training_step."""
    from kd_lightning.gans import d_loss_parts, g_loss
    from kd_lightning.teachers import connect_teacher

    teacher = f"{tmp}/teacher/checkpoints/last.ckpt"
    cli = build_cli(gan_argv(args, tmp, f"{tmp}/{tag}", 2, teacher), run=False)
    m, dm = cli.model, cli.datamodule
    dm.setup("fit")
    opt_g, opt_d = m.configure_optimizers()
    client = connect_teacher(teacher, responses="soft", journal=f"{tmp}/{tag}.bin")
    clock = PartClock()
    instrument(clock, m, client, [opt_g, opt_d])
    m.train()
    hp = m.hparams
    cpu0, wall0, warmup = 0.0, 0.0, 2
    for done, batch in enumerate(dm.train_dataloader()):
        if done == warmup:
            clock.tick()
            clock.active = True
            cpu0, wall0 = time.thread_time(), time.perf_counter()
        if done == warmup + args.steps:
            break
        real = batch["image"] * 2 - 1
        with clock.part("training_step"):
            with torch.no_grad():
                fake = m.generator(m.noise(len(real)))
            real_d, fake_d = d_loss_parts(m.d_logits(real, None), m.d_logits(fake, None), hp.loss)
            d_loss = real_d + fake_d
        opt_d.zero_grad(set_to_none=True)
        with clock.part("backward"):
            d_loss.backward()
        opt_d.step()
        m.discriminator.requires_grad_(False)  # Lightning's toggled_optimizer(opt_g)
        with clock.part("training_step"):
            fake = m.generator(m.noise(len(real)))
            d = m.d_logits(fake, None)
            loss = g_loss(d, hp.loss)
            conf = client.query(((fake.detach() + 1) / 2).clamp(0, 1)).max(-1).values.float()
            loss = loss + hp.alpha * -(conf * F.logsigmoid(d)).mean()
        opt_g.zero_grad(set_to_none=True)
        with clock.part("backward"):
            loss.backward()
        opt_g.step()
        m.discriminator.requires_grad_(True)
        m.g_steps += 1
        m.update_ema()
    clock.tick()
    clock.active = False
    out = summarise(clock, time.thread_time() - cpu0, time.perf_counter() - wall0, args.steps, 0)
    client.close()
    return out


# ------------------------------------------------------------------------------------------------ HTTP
def paid_query_ms(teacher: str, tmp: str, http: bool, repeats: int = 5) -> dict[str, float]:
    """CPU and wall ms of one paid query of 128 new images (journal on), in-process and over HTTP, split."""
    from kd_lightning.teachers import connect_teacher

    out: dict[str, float] = {}
    spec: list[tuple[str, str]] = [("local", teacher)]
    proc = None
    if http:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "kd_lightning.serve.server", "--ckpt", teacher, "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spec.append(("http", f"http://127.0.0.1:{port}"))
    try:
        for name, where in spec:
            client = connect_teacher(where, responses="soft", journal=f"{tmp}/paid_{name}.bin")
            if name == "http":
                _wait(client)
            clock = PartClock()
            instrument(clock, _Bare(), client, [])
            client.query(torch.rand(128, 1, 28, 28))  # warm-up
            walls = []
            clock.active = True
            for _ in range(repeats):
                x = torch.rand(128, 1, 28, 28)
                t = time.perf_counter()
                client.query(x)
                walls.append(time.perf_counter() - t)
            clock.tick()
            parts = clock.parts()
            out[f"{name}: whole query (wall)"] = 1000 * statistics.median(walls)
            for label, key in (
                ("teacher answers (in-process model / HTTP)", "post"),
                ("journal append (write + fsync)", "append"),
                ("teacher query: hash, lock, journal lookup", "rest"),
            ):
                out[f"{name}: {key} (CPU)"] = 1000 * parts.get(label, 0.0) / repeats
            client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    return out


class _Bare:
    pass


def _wait(client: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.open()
            return
        except Exception:  # the server is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ main
def make_checkpoints(tmp: str) -> None:
    """A resnet8 teacher (a few steps of teacher.yaml) and an official-layout generator (a few GAN steps)."""
    cli = build_cli(
        [
            *("--config", str(RECIPES / "teacher.yaml"), "--trainer.default_root_dir", f"{tmp}/teacher", *QUIET),
            *("--trainer.logger", "false", "--trainer.max_steps", "20", "--trainer.limit_val_batches", "1"),
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    teacher = f"{tmp}/teacher/checkpoints/last.ckpt"
    cli = build_cli(gan_argv(argparse.Namespace(), tmp, f"{tmp}/gan", 4, teacher), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="*", default=[*ARMS, "deprivatize"], help="which to time")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (after one untimed epoch)")
    p.add_argument("--pool", type=int, default=256, help="pool size of the timed runs (its epoch is the warm-up)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--val-at", type=int, default=4, help="validation after this many steps (one in the window)")
    p.add_argument("--val-every", type=int, default=250, help="the pipeline's val_every, to amortise validation")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--http", action="store_true", help="also time a paid query through kdl serve-teacher")
    p.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden")
    results: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoints(tmp)
        for r in range(args.repeats):
            for arm in args.arms:
                if arm == "deprivatize":
                    todo: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
                        ("kdl", lambda tag: run_gan_kdl(args, tmp, tag)),
                        ("plain", lambda tag: run_gan_plain(args, tmp, tag)),
                    ]
                else:
                    todo = [
                        ("kdl", lambda tag, a=arm: run_kdl(a, args, tmp, tag, True)),
                        ("plain", lambda tag, a=arm: run_plain(a, args, tmp, tag)),
                    ]
                    if ARMS[arm][2]:
                        todo.append(("kdl, no cache (old)", lambda tag, a=arm: run_kdl(a, args, tmp, tag, False)))
                for name, fn in todo if r % 2 == 0 else todo[::-1]:
                    res = fn(f"{arm}_{name.split(',')[0]}_{len(results[arm][name])}_{r}")
                    results[arm][name].append(res)
                    print(f"repeat {r}: {arm:11s} {name:20s} {res['step_cpu']:8.1f} CPU ms/step", flush=True)
        paid = paid_query_ms(f"{tmp}/teacher/checkpoints/last.ckpt", tmp, args.http)
    text = render(results, paid, args)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# MEKD pipeline steps (benchmarks/mekd_step.py)\n\n{text}\n")
    return text


def render(
    results: dict[str, dict[str, list[dict[str, Any]]]], paid: dict[str, float], args: argparse.Namespace
) -> str:
    load = os.getloadavg()
    lines = [
        f"Fashion-MNIST, batch {args.batch} (stage 1: 64), 1 thread, torch {torch.__version__}; {args.repeats} repeats "
        f"x {args.steps} timed steps after one paid epoch (pool {args.pool}); medians; parts in thread-CPU ms per "
        f"step; load average at the end {load[0]:.1f} / {load[1]:.1f}",
        "",
    ]
    for arm, scen in results.items():
        names = list(scen)
        med = {
            n: {k: statistics.median(x[k] for x in scen[n]) for k in ("step_cpu", "step_wall", "val_cpu")}
            for n in names
        }
        labels = [lab for lab, _ in PARTS] + sorted(
            {k for n in names for x in scen[n] for k in x["parts"]} - {lab for lab, _ in PARTS}
        )
        lines += [
            f"**{arm}**",
            "",
            "| part (CPU ms / step) | " + " | ".join(names) + " |",
            "|---" + "|---:" * len(names) + "|",
        ]
        for lab in labels:
            vals = [statistics.median(x["parts"].get(lab, 0.0) for x in scen[n]) for n in names]
            if any(v >= 0.05 for v in vals):
                lines.append(f"| {lab} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
        lines.append(
            "| **training step, CPU ms** | " + " | ".join(f"**{med[n]['step_cpu']:.0f}**" for n in names) + " |"
        )
        lines.append("| training step, wall ms | " + " | ".join(f"{med[n]['step_wall']:.0f}" for n in names) + " |")
        if arm != "deprivatize":
            v = med["kdl"]["val_cpu"]
            lines.append(
                f"| validation + checkpoint, CPU ms per run (per step at val_every {args.val_every}) | "
                f"{v:.0f} ({v / args.val_every:.1f}) |" + " |" * (len(names) - 1)
            )
        ratios = [f"kdl/plain {med['plain']['step_cpu'] / med['kdl']['step_cpu']:.2f} (speed, CPU)"]
        if "kdl, no cache (old)" in med:
            ratios.append(
                f"cache speed-up {med['kdl, no cache (old)']['step_cpu'] / med['kdl']['step_cpu']:.2f}x (CPU)"
            )
        lines += ["", "; ".join(ratios), ""]
    lines += projection(results, args)
    lines += ["**A paid query of 128 new images** (journal on; CPU ms of this process, wall ms of the whole query)", ""]
    lines += ["| | ms |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in paid.items()]
    return "\n".join(lines)


def projection(results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace) -> list[str]:
    """Stage 1 and stage 2 of pipeline.yaml (seed 0, one budget) in CPU hours on one core, from the medians."""

    def med(arm: str, scen: str, key: str = "step_cpu") -> float | None:
        runs = results.get(arm, {}).get(scen)
        return statistics.median(x[key] for x in runs) if runs else None

    rows, totals = [], {"new": 0.0, "old": 0.0}
    gan = results.get("deprivatize", {}).get("kdl")
    if gan:  # the query of every generator step here, every 100th in the pipeline
        q = statistics.median(
            sum(x["parts"].get(lab, 0.0) for lab in [PARTS[2][0], PARTS[3][0], PARTS[4][0]]) for x in gan
        )
        t = (statistics.median(x["step_cpu"] for x in gan) - 0.99 * q) * 4800 / 3.6e6
        rows.append(f"| stage 1 (4,800 D + G steps, L_IM every 100th) | {t:.2f} | {t:.2f} |")
        totals["new"] += t
        totals["old"] += t
    # (pipeline arm, measured arm) for the 2,500-step arms; reference ~ kd_soft's step (tinynet on local images)
    for name, arm in (
        ("mekd_soft_tau2", "mekd_soft"),
        ("mekd_soft_tau", "mekd_soft"),
        ("mekd_hard", "mekd_hard"),
        ("kd_gz", "kd_gz"),
        ("kd_soft", "kd_soft"),
        ("ce_hard", "kd_soft"),
        ("reference", "kd_soft"),
    ):
        new, val = med(arm, "kdl"), med(arm, "kdl", "val_cpu")
        if new is None or val is None:
            continue
        old = med(arm, "kdl, no cache (old)") or new
        hours = [(x * 2500 + val * 2500 / args.val_every) / 3.6e6 for x in (new, old)]
        rows.append(f"| {name} (2,500 steps, validation every {args.val_every}) | {hours[0]:.2f} | {hours[1]:.2f} |")
        totals["new"] += hours[0]
        totals["old"] += hours[1]
    if not rows:
        return []
    return [
        "**Projected CPU hours on one core** (pipeline.yaml, one seed, one budget; the teacher, the gate and the "
        "tests not included; an idle core runs about at CPU time)",
        "",
        "| stage | with the pool cache | before (no cache) |",
        "|---|---:|---:|",
        *rows,
        f"| **total** | **{totals['new']:.1f}** | **{totals['old']:.1f}** |",
        "",
    ]


if __name__ == "__main__":
    main()
