"""One AI-KD training step, part by part, against the plain supervised step in the same process.

The evidence recipe's setting (recipes/pipelines/aikd_fashion_mnist_overfit.yaml): Fashion-MNIST at 32 px,
resnet8, 1,000 training images in batches of 32 with crop + flip, ``recipes/fashion_mnist/aikd.yaml``'s critic
schedule (5 critic updates per student step, Adam 1e-3) against ``recipes/fashion_mnist/student.yaml``. Both run
through ``kdl``'s own CLI and Lightning's Trainer (one epoch, no validation, no logger, no checkpoint); the two
scenarios alternate within every repeat and each part's median over the repeats is reported, so that a machine
shared with other work shows in the spread, not in the ratio.

Every moment of the timed steps is charged to exactly one part, the innermost one running (``perf_counter``
around the methods named below, wrapped on the model instance; CPU ops are synchronous, so wall time is where
the work is): S_sup's forward, the student's forward and backward and its SGD step, the critic's updates
(forward, penalty gradient, backward through the penalty's double backward, Adam), the student's loss terms
(the adversarial term's critic pass apart), cos(adversarial, guide), the progressive store's update, the
eval-mode pass (only under Mixup/CutMix, not in this recipe), the rest of ``training_step`` (logging, metrics)
and everything between two steps (Lightning's loop, the DataLoader, callbacks).

    python -m benchmarks.aikd_step                            # 3 repeats of 20 timed steps, 1 thread
    python -m benchmarks.aikd_step --repeats 5 --out docs/results/aikd_step.md

Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import REPO, quiet_lightning
from kd_lightning.cli import build_cli

#: (part label, its rule: the path of open wrappers, innermost last, must end with these names)
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("S_sup forward (no grad)", ("guide",)),
    ("student forward", ("net",)),
    ("eval-mode pass (mixing only)", ("clean_logits",)),
    ("student backward", ("student_backward",)),
    ("student SGD step", ("sgd",)),
    ("critic: forward", ("critic_parts", "critic")),
    ("critic: penalty grad + loss", ("critic_parts",)),
    ("critic: backward (double backward)", ("critic_update", "critic_backward")),
    ("critic: Adam step", ("critic_update", "adam")),
    ("critic: rest (zero_grad, log, W)", ("critic_update",)),
    ("adversarial term: critic forward", ("student_parts", "critic")),
    ("loss terms (CE, KL, L_A)", ("student_parts",)),
    ("cos(adv, guide) grads", ("cosine",)),
    ("store update", ("remember",)),
    ("training_step rest (log, metrics)", ("training_step",)),
    ("Lightning loop, data, callbacks", ()),
)


class PartClock:
    """Charges wall time to the path of open wrappers (outermost first) while active."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.totals: dict[tuple[str, ...], float] = defaultdict(float)
        self.active = False
        self.t = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.active:
            self.totals[tuple(self.stack)] += now - self.t
        self.t = now

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._tick()
            self.stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._tick()
                self.stack.pop()

        return timed

    def parts(self, steps: int) -> dict[str, float]:
        """ms per step of every part in :data:`PARTS` (a path goes to the first rule that it ends with)."""
        out: dict[str, float] = defaultdict(float)
        for path, seconds in self.totals.items():
            names = path
            for label, rule in PARTS:
                if (rule == () and names == ()) or (rule and _ends_with(names, rule)):
                    out[label] += 1000 * seconds / steps
                    break
            else:
                out["other: " + "/".join(names)] += 1000 * seconds / steps
        return dict(out)


def _ends_with(names: tuple[str, ...], rule: tuple[str, ...]) -> bool:
    """``names`` ends with ``rule[-1]`` and holds ``rule``'s other names before it, in order."""
    if not names or names[-1] != rule[-1]:
        return False
    it = iter(names[:-1])
    return all(any(n == r for n in it) for r in rule[:-1])


class Instrument(L.Callback):
    """Wraps the model's parts with the clock at fit start; times steps ``warmup`` .. the last batch."""

    def __init__(self, clock: PartClock, warmup: int) -> None:
        self.clock, self.warmup = clock, warmup
        self.steps = 0
        self.seconds = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        c, m = self.clock, pl_module
        m.training_step = c.wrap("training_step", m.training_step)  # type: ignore[method-assign]
        m.net.forward = c.wrap("net", m.net.forward)  # type: ignore[method-assign]
        guide = getattr(m, "guide", None)
        if guide is not None:
            guide.forward = c.wrap("guide", guide.forward)  # type: ignore[method-assign]
        critic = getattr(m, "critic", None)
        if critic is not None:
            critic.forward = c.wrap("critic", critic.forward)  # type: ignore[method-assign]
            m.critic_update = c.wrap("critic_update", m.critic_update)  # type: ignore[method-assign]
            m.critic_parts = c.wrap("critic_parts", m.critic_parts)  # type: ignore[method-assign]
        for name, attr in (
            ("student_parts", "student_parts"),
            ("cosine", "adversarial_guide_cosine"),
            ("remember", "remember"),
            ("clean_logits", "_clean_logits"),
        ):
            if hasattr(m, attr):
                setattr(m, attr, c.wrap(name, getattr(m, attr)))
        # backward: the critic's inside critic_update, the student's elsewhere (manual or automatic optimisation)
        manual = m.manual_backward

        def manual_backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            name = "critic_backward" if "critic_update" in c.stack else "student_backward"
            c.wrap(name, manual)(loss, *args, **kwargs)

        m.manual_backward = manual_backward  # type: ignore[method-assign]
        m.backward = c.wrap("student_backward", m.backward)  # type: ignore[method-assign]
        for opt in trainer.optimizers:
            name = "adam" if isinstance(opt, torch.optim.Adam) else "sgd"
            opt.step = c.wrap(name, opt.step)  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.warmup:
            self.clock._tick()
            self.clock.active = True
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx >= self.warmup and idx == trainer.num_training_batches - 1:
            self.clock._tick()
            self.clock.active = False
            self.seconds = time.perf_counter() - self._t0
            self.steps = idx - self.warmup + 1


def argv_for(kind: str, args: argparse.Namespace, root: str, ssup: str | None) -> list[str]:
    recipe = "aikd.yaml" if kind == "aikd" else "student.yaml"
    argv = [
        "--config",
        str(REPO / "recipes" / "fashion_mnist" / recipe),
        "--trainer.default_root_dir",
        root,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        str(args.warmup + args.steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.init_args.batch_size",
        str(args.batch),
        "--data.init_args.train_size",
        str(args.train_size),
        "--data.init_args.num_workers",
        "0",
    ]
    if ssup is None:  # the S_sup maker (another seed than the runs: AIKD warns about the same seed)
        return [*argv, "--trainer.limit_train_batches", "1", "--seed_everything", "1"]
    argv += ["--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]
    if kind == "aikd":
        argv += ["--model.init_args.pretrained", ssup, *args.aikd_args]
    return argv


def run(kind: str, args: argparse.Namespace, root: str, ssup: str) -> dict[str, Any]:
    clock = PartClock()
    cli = build_cli(argv_for(kind, args, root, ssup), run=False)
    inst = Instrument(clock, args.warmup)
    cli.trainer.callbacks.append(inst)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if inst.steps == 0:
        raise RuntimeError(f"{kind}: no step timed")
    return {"parts": clock.parts(inst.steps), "step_ms": 1000 * inst.seconds / inst.steps}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aikd-args", nargs="*", default=[], help="more kdl arguments for the AI-KD run")
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    # our timers wrap optimizer.step after the LR scheduler has patched it; the scheduler still sees every step
    warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden")
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "aikd": []}
    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli(argv_for("baseline", args, f"{tmp}/ssup", None), run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        ssup = str(Path(tmp) / "ssup" / "checkpoints" / "last.ckpt")
        for r in range(args.repeats):
            for kind in ("baseline", "aikd") if r % 2 == 0 else ("aikd", "baseline"):
                torch.manual_seed(r)
                runs[kind].append(run(kind, args, f"{tmp}/{kind}{r}", ssup))
                print(f"repeat {r}: {kind:8s} {runs[kind][-1]['step_ms']:7.1f} ms/step", flush=True)
    labels = [lab for lab, _ in PARTS]
    labels += sorted({k for rs in runs.values() for x in rs for k in x["parts"] if k not in labels})

    def med(kind: str, label: str) -> float:
        return statistics.median(x["parts"].get(label, 0.0) for x in runs[kind])

    step = {k: statistics.median(x["step_ms"] for x in runs[k]) for k in runs}
    spread = {k: (min(x["step_ms"] for x in runs[k]), max(x["step_ms"] for x in runs[k])) for k in runs}
    rows = ["| part (ms per step, median) | baseline | AI-KD |", "|---|---:|---:|"]
    for label in labels:
        b, a = med("baseline", label), med("aikd", label)
        if b or a:
            rows.append(f"| {label} | {b:.2f} | {a:.2f} |")
    (b_lo, b_hi), (a_lo, a_hi) = spread["baseline"], spread["aikd"]
    rows.append(
        f"| **whole step** (min-max) | **{step['baseline']:.1f}** ({b_lo:.1f}-{b_hi:.1f}) | "
        f"**{step['aikd']:.1f}** ({a_lo:.1f}-{a_hi:.1f}) |"
    )
    ratios = [a["step_ms"] / b["step_ms"] for a, b in zip(runs["aikd"], runs["baseline"], strict=True)]
    load = os.getloadavg()
    text = "\n".join(
        [
            f"resnet8, Fashion-MNIST 32 px, batch {args.batch}, {args.train_size} training images, "
            f"{args.threads} thread(s); {args.repeats} repeats x {args.steps} timed steps (after {args.warmup}), "
            f"the two scenarios alternating; AI-KD args {args.aikd_args or 'none'}; torch {torch.__version__}; "
            f"load average at the end {load[0]:.1f} / {load[1]:.1f}",
            "",
            *rows,
            "",
            f"AI-KD / baseline: **{step['aikd'] / step['baseline']:.2f}x** (median step times); per repeat "
            + ", ".join(f"{x:.2f}" for x in ratios),
        ]
    )
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# AI-KD step vs the supervised step (benchmarks/aikd_step.py)\n\n{text}\n")
    return text


if __name__ == "__main__":
    main()
