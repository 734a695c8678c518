"""Speed of ``kdl generate``'s proposals (generator -> uint8 -> DR encoder features -> DR MLP -> teacher), phase
by phase, and what each speed option buys, as a share of the fp32 matmul peak measured in this same process.

One chunk of ``batch_size`` proposals is what :meth:`Generation.propose` makes (plus the teacher pass of
:meth:`Generation.add_teacher` when the filtering teacher is not the DR encoder). The variants alternate
within every repeat; medians over repeats are reported, with the ratio to the first variant (the code
as it was: ``no_grad``, one forward pass per chunk, unfolded nets, NCHW generator) and to the peak of the
same repeat. Model FLOPs per proposal are counted with ``torch.utils.flop_counter`` on one chunk.

    python -m benchmarks.generation --generator G.ckpt --density-ratio DR.ckpt --teacher T.ckpt
    python -m benchmarks.generation ... --out docs/results/generation.md

The checkpoints come from a cGAN-KD chain, e.g. ``kdl pipeline --config recipes/cgankd/fashion_mnist/pipeline.yaml``
(its ``cgan``, ``dr`` and ``teacher`` stages; a DR checkpoint that records its encoder's hash lets the filtering
teacher's outputs come from the encoder pass). Timings vary with the machine's load: never assert them in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import count_flops, fp32_peak_flops, report
from benchmarks.profile_step import PhaseClock
from kd_lightning.cli import cpu_defaults
from kd_lightning.sampling.generate import GenerateConfig, Generation, Unit

#: name -> (inference_mode, forward_batch, fast_inference, compile); forward_batch None = the chunk
VARIANTS = {
    "no_grad, one pass per chunk (as before)": (False, None, False, False),
    "+ inference_mode": (True, None, False, False),
    "+ forward_batch 100 (default now)": (True, 100, False, False),
    "+ forward_batch 50": (True, 50, False, False),
    "+ fast_inference": (True, 100, True, False),
    "+ fast_inference + compile": (True, 100, True, True),
}


def configure(run: Generation, inference: bool, forward_batch: int | None, fast: bool, compiled: bool = False) -> None:
    run.grad_mode = torch.inference_mode if inference else torch.no_grad
    run.micro_batch = forward_batch or run.cfg.batch_size
    run.set_fast_inference(fast, compiled)


def hook_phases(run: Generation, clock: PhaseClock) -> list:
    handles = []
    nets = {"generator": run.run_gen, "DR MLP": run.dr.head if run.dr is not None else None}
    frozen = {"DR encoder": run.dr.encoder if run.dr is not None else None, "teacher": run.teacher}
    for label, ft in frozen.items():
        if ft is not None and not (label == "teacher" and run.teacher_is_encoder):
            for net in {id(ft.net): ft.net, id(ft.inference_net()): ft.inference_net()}.values():
                nets[f"{label} ({'folded' if net is not ft.net else 'unfolded'})"] = net
    for label, m in nets.items():
        # a compiled net's hooks would be traced into its graph: its time stays in "host work (rest)"
        if m is not None and getattr(m, "_compiled_call_impl", None) is None:
            handles.append(m.register_forward_pre_hook(lambda *_, n=label: clock.push(n)))
            handles.append(m.register_forward_hook(lambda *_, n=label: clock.pop(n), always_call=True))
    return handles


def one_chunk(run: Generation, unit: Unit, k: int) -> None:
    p = run.propose(unit, k, run.cfg.batch_size)
    take = {key: v for key, v in p.items() if key not in ("uniform", "inside")}
    run.add_teacher(take)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", required=True, help="the cGAN checkpoint (a `cgan` stage's last.ckpt)")
    p.add_argument("--density-ratio", required=True, help="the DR checkpoint (a `dr` stage's)")
    p.add_argument("--teacher", required=True, help="the filtering teacher's checkpoint")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--chunks", type=int, default=3, help="timed chunks per variant and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cpu_defaults()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GenerateConfig(
            generator=args.generator,
            density_ratio=args.density_ratio,
            teacher=args.teacher,
            out=tmp,
            per_class=1,
            batch_size=args.batch_size,
            progress=False,
        )
        run = Generation(cfg)
    unit = run.units[0]
    clocks = {v: PhaseClock() for v in VARIANTS}
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: list[float] = []
    for r in range(args.repeats):
        peaks.append(fp32_peak_flops(seconds=0.6))
        for name, (inference, forward_batch, fast, compiled) in VARIANTS.items():
            configure(run, inference, forward_batch, fast, compiled)
            one_chunk(run, unit, 0)  # warm-up (the folded copies are built and compiled here)
            handles = hook_phases(run, clocks[name])
            clocks[name].start()
            t0 = time.perf_counter()
            for k in range(args.chunks):
                one_chunk(run, unit, 1 + k)
            rates[name].append(args.chunks * args.batch_size / (time.perf_counter() - t0))
            clocks[name].stop()
            for h in handles:
                h.remove()
            print(f"repeat {r}: {name:32s} {rates[name][-1]:8.1f} proposals/s", flush=True)
    configure(run, True, 100, False)
    flops = count_flops(lambda: one_chunk(run, unit, 0)) / args.batch_size
    base = next(iter(VARIANTS))
    load = os.getloadavg()
    med = {v: statistics.median(x) for v, x in rates.items()}
    ratio = {v: statistics.median(a / b for a, b in zip(rates[v], rates[base])) for v in VARIANTS}
    share = {v: statistics.median(x * flops / pk for x, pk in zip(rates[v], peaks)) for v in VARIANTS}
    lines = [
        f"generator {args.generator}, DR {args.density_ratio}, teacher {args.teacher} "
        f"(teacher {'is' if run.teacher_is_encoder else 'is not'} the DR encoder); chunks of {args.batch_size}; "
        f"{torch.get_num_threads()} threads; {args.repeats} alternated repeats of {args.chunks} chunks; "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"{flops / 1e6:.1f} MFLOP per proposal; fp32 matmul peak per repeat "
        f"{', '.join(f'{x / 1e9:.1f}' for x in peaks)} GFLOP/s",
        "",
        "| variant | median proposals/s | median ratio to first | median % of the repeat's peak |",
        "|---|---|---|---|",
        *[f"| {v} | {med[v]:.1f} | {ratio[v]:.2f} | {100 * share[v]:.1f}% |" for v in VARIANTS],
        "",
        "Where the time goes (share of the timed chunks, all repeats; a compiled net carries no timing hooks, so "
        "variants with compiled nets are not split):",
        "",
        "| phase | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    phases = sorted({ph for c in clocks.values() for ph in c.totals}, key=lambda s: (s == "framework", s))
    for ph in phases:
        cells = []
        for v, c in clocks.items():
            total = sum(c.totals.values())
            cells.append(f"{100 * c.totals.get(ph, 0.0) / total:.0f}%" if total and not VARIANTS[v][3] else "-")
        lines.append(f"| {'host work (rest)' if ph == 'framework' else ph} | " + " | ".join(cells) + " |")
    report("\n".join(lines), args.out, "kdl generate: proposals")


if __name__ == "__main__":
    main()
