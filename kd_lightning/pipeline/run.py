"""Running the planned stages: one ``kdl`` process each, with its log, record and locks; Ctrl-C and SIGTERM.

With ``--jobs N`` the stages whose inputs are ready run side by side (graphlib's ``TopologicalSorter``).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from types import FrameType
from typing import Any, TextIO

from kd_lightning.pipeline import process
from kd_lightning.pipeline.plan import Decision, Planner, dependencies, describe_status
from kd_lightning.pipeline.report import Console, find_plots, results_table, stage_results
from kd_lightning.pipeline.schema import Interrupted, StageFailed, Step, sha
from kd_lightning.pipeline.state import now


@dataclass
class Running:
    """A stage whose process runs: what it needs to be waited for, stopped and recorded."""

    step: Step
    resume: bool
    proc: subprocess.Popen
    log: TextIO
    held: contextlib.ExitStack  # its locks
    rec: dict[str, Any] = field(default_factory=dict)
    since: float = 0.0  # attempt start, epoch seconds (what the progress file must be newer than)
    t0: float = 0.0  # attempt start, monotonic

    @property
    def state(self) -> str:
        return "resuming" if self.resume else "running"


class Runner(Planner):
    """Runs the stages that the planner says to run, ``jobs`` at a time, in an order that respects their inputs."""

    def __init__(
        self,
        steps: list[Step],
        selected: set[str] | None = None,
        force: bool = False,
        out: TextIO | None = None,
        jobs: int = 1,
    ) -> None:
        super().__init__(steps, selected, force)
        self.console = Console(steps, out or sys.stdout)
        self.out, self.tty = self.console.out, self.console.tty
        self.jobs = max(1, jobs)
        self.running: dict[str, Running] = {}
        self.interrupted: int | None = None
        self.background = process.Background(self.console, lambda: self.interrupted)

    # ------------------------------------------------------------------ display
    def print_results(self) -> None:
        """The results of the selected fit and test stages (this run's or a skipped stage's), and the plots."""
        rows, folders = [], []
        for step in self.steps:
            rec = self.records.get(step.name) or {}
            if step.name not in self.selected or rec.get("status") != "done":
                continue
            results = rec.get("results")
            if not results:  # a record from before results were kept (or before a GAN's quality was read)
                results = stage_results(step.command, step.dir)
            rows.append((step.name, step.command, step.dir, results))
            folders.append(step.dir)
            folders += [step.artifacts[k] for k in step.spec.get("outputs", {})]  # a store's grids and histograms
        table = results_table(rows)
        if table:
            self.out.write(f"\nResults (fits: best validation metric; tests: the test split):\n{table}\n")
        plots = find_plots(folders)
        if plots:
            self.out.write("Plots:\n" + "".join(f"  {p}\n" for p in plots))
        self.out.flush()

    def print_plan(self) -> None:
        for step, d in self.plan():
            self.console.line(step, d.action, d.reason + "".join(f"; replaces {p}" for p in self.replaced(step, d)))
            if d.action in ("run", "resume", "start"):
                extra = ["--ckpt_path", "last"] if d.action == "resume" else []
                self.out.write(f"      $ {step.shown(extra)}\n")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl-C / SIGTERM: SIGTERM to every running stage (each saves and exits); a second one: SIGKILL."""
        first = self.interrupted is None
        self.interrupted = signum
        for running in list(self.running.values()):
            process.signal_group(running.proc, signal.SIGTERM if first else signal.SIGKILL)

    # ------------------------------------------------------------------ one stage
    def start_step(self, step: Step, decision: Decision) -> Running:
        """Lock the stage, clear what ``overwrite`` replaces, record it as running and start its process."""
        held = process.lock(step)
        try:
            return self._start(step, decision, held)
        except BaseException:
            held.close()
            raise

    def _start(self, step: Step, decision: Decision, held: contextlib.ExitStack) -> Running:
        rec = self.records.get(step.name) or {}
        made_by = rec.get("made_by")
        for path in self.replaced(step, decision):
            self.console.write(f"      removing {path} (overwrite: the stage runs anew)\n")
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            made_by = None
        resume = decision.action == "resume"
        extra = ["--ckpt_path", "last"] if resume else []
        attempt_start = time.time()
        rec = {
            "stage": step.name,
            "status": "running",
            "command": step.shown(extra),
            "config_hash": step.config_hash,
            "spec": step.spec,
            "inputs": self.input_hashes(step),
            "log": step.log_path,
            "started": now(),
            "run_started": rec.get("run_started", attempt_start) if resume else attempt_start,
            "attempts": (int(rec.get("attempts", 0)) + 1) if resume else 1,
            "seconds": float(rec.get("seconds", 0.0)) if resume else 0.0,
            "made_by": made_by,
        }
        self.write_record(step, rec)
        # a start line of its own where the live line cannot show it: no terminal, or several stages at once
        state = "resuming" if resume else "running"
        self.console.line(step, state, f"log: {step.log_path}", final=not self.tty or self.jobs > 1)
        log = held.enter_context(open(step.log_path, "a"))  # noqa: SIM115 - closed with the locks
        t0 = time.monotonic()
        proc = process.popen(step, extra, log)
        return Running(step, resume, proc, log, held, rec, attempt_start, t0)

    def finish_step(self, running: Running) -> str:
        """Record a stage whose process ended; returns its outcome, or raises StageFailed / Interrupted."""
        try:
            return self._finish(running)
        finally:
            running.held.close()

    def _finish(self, running: Running) -> str:
        step, proc, rec = running.step, running.proc, running.rec
        seconds = time.monotonic() - running.t0
        rec.update(finished=now(), seconds=round(rec["seconds"] + seconds, 3), returncode=proc.returncode)
        if self.interrupted is not None:
            rec["status"] = "interrupted"
            self.write_record(step, rec)
            self.console.line(step, "interrupted", f"{seconds:.1f} s ({describe_status(proc.returncode)})")
            raise Interrupted(self.interrupted)
        if proc.returncode != 0:
            rec["status"] = "failed"
            self.write_record(step, rec)
            self.console.line(step, "failed", f"{seconds:.1f} s")
            raise StageFailed(
                step,
                process.exit_status(proc.returncode),
                f"stage {step.name!r} failed with {describe_status(proc.returncode)}; log: {step.log_path}\n"
                + process.tail(step.log_path),
            )
        outputs = self.outputs(step)
        gone = [p for p in step.required if not os.path.exists(p)]
        if step.command == "fit" and "best" not in outputs and "last" not in outputs:
            gone = gone or [step.artifacts["last"]]
        if gone:
            rec["status"] = "failed"
            self.write_record(step, rec)
            self.console.line(step, "failed", f"{seconds:.1f} s")
            raise StageFailed(
                step, 1, f"stage {step.name!r} exited 0 but did not write {gone[0]}; log: {step.log_path}"
            )
        inputs = rec["inputs"]
        rec.update(status="done", outputs=outputs, made_by={"config_hash": step.config_hash, "inputs": inputs})
        rec["results"] = stage_results(step.command, step.dir, since=float(rec["run_started"]) - 1)
        rec["fingerprint"] = sha(
            json.dumps([step.config_hash, inputs, {k: v["sha256"] for k, v in outputs.items()}], sort_keys=True)
        )
        self.write_record(step, rec)
        resumed = f" (resumed; {rec['seconds']:.1f} s in all)" if running.resume else ""
        self.console.line(step, "done", f"{seconds:.1f} s{resumed}")
        from kd_lightning.sampling.consistency import store_chance_warning  # a store no better than chance

        for path in (step.artifacts[a] for a in outputs if a not in ("best", "last")):
            if warning := store_chance_warning(path):
                print(f"kdl pipeline: stage {step.name!r}: {warning}", file=sys.stderr)
        return "resumed" if running.resume else "done"

    def _stop_running(self) -> None:
        """Stop the stages still running (the pipeline itself failed); each is recorded as interrupted."""
        for name, running in list(self.running.items()):
            process.stop(running.proc)
            rec = running.rec
            rec.update(status="interrupted", finished=now(), returncode=running.proc.returncode)
            rec["seconds"] = round(rec["seconds"] + time.monotonic() - running.t0, 3)
            with contextlib.suppress(OSError):
                self.write_record(running.step, rec)
            running.held.close()
            self.console.line(running.step, "interrupted", f"({describe_status(running.proc.returncode)})")
            del self.running[name]

    # ------------------------------------------------------------------ the pipeline
    def run(self) -> dict[str, str]:
        """Run the pipeline; returns each selected stage's outcome (done / skipped / ...).

        A stage starts once every stage it waits for (:func:`~kd_lightning.pipeline.plan.dependencies`) is done,
        skipped or not selected, lowest position first, while fewer than ``jobs`` stages run. After a failure no
        stage starts; those already running (none of which needs the failed one) finish and are recorded.
        """
        outcome: dict[str, str] = {}
        handlers = {}
        with contextlib.suppress(ValueError):  # signal handlers only in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._schedule(outcome)
        finally:
            self._stop_running()
            self.background.stop_all()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return outcome

    def _schedule(self, outcome: dict[str, str]) -> None:
        sorter = TopologicalSorter(dependencies(self.steps))
        sorter.prepare()
        ready: list[tuple[int, str]] = []  # a heap: the lowest position first
        pending_bg: list[Step] = []  # background stages to start before the next later stage that runs
        failure: StageFailed | None = None
        while True:
            while failure is None and self.interrupted is None:
                for name in sorter.get_ready():
                    heapq.heappush(ready, (self.by_name[name].index, name))
                if not ready or len(self.running) >= self.jobs:
                    break
                step = self.by_name[heapq.heappop(ready)[1]]
                try:
                    if self._begin(step, outcome, pending_bg):
                        continue
                except StageFailed as e:
                    failure = e
                    break
                sorter.done(step.name)
            if not self.running:  # and nothing left to start
                if self.interrupted is not None:
                    raise Interrupted(self.interrupted)
                if failure is not None:
                    raise failure
                return
            for running in self._wait():
                del self.running[running.step.name]
                try:
                    outcome[running.step.name] = self.finish_step(running)
                    sorter.done(running.step.name)
                except Interrupted:
                    pass
                except StageFailed as e:
                    if failure is None:
                        failure = e
                    else:  # a second stage failed while the first one's fellows finished
                        print(f"kdl pipeline: {e}", file=sys.stderr)

    def _begin(self, step: Step, outcome: dict[str, str], pending_bg: list[Step]) -> bool:
        """Decide ``step`` and start it; returns True when it now runs, False when it is settled (skipped, ...)."""
        if step.background:
            pending_bg.append(step)
            return False
        d = self.decide(step)
        if d.action == "off":
            return False
        if d.action == "skip":
            self.console.line(step, "skipped", d.reason)
            outcome[step.name] = "skipped"
            return False
        if d.action == "blocked":
            raise StageFailed(step, 2, f"stage {step.name!r} cannot run: {d.reason}")
        # a background stage starts before the first later stage that runs, when --only/--from selected it or
        # when this stage reads it (a server the stage needs starts even if the selection left it out)
        wanted = {ref.split(".", 1)[0] for ref in step.refs}
        for bg in [b for b in pending_bg if b.index < step.index and (b.name in self.selected or b.name in wanted)]:
            self.background.start(bg)
            outcome[bg.name] = "started"
            pending_bg.remove(bg)
        running = self.running[step.name] = self.start_step(step, d)
        if self.interrupted is not None:  # the signal came while the stage was starting
            process.signal_group(running.proc, signal.SIGTERM)
        return True

    def _wait(self) -> list[Running]:
        """Wait until at least one running stage has exited (redrawing the live line each second); return those."""
        last_draw = time.monotonic()
        while True:
            ended = [r for r in self.running.values() if r.proc.poll() is not None]
            if ended:
                return ended
            if time.monotonic() - last_draw >= 1.0:
                self.console.live([(r.step, r.state, r.since, r.t0) for r in self.running.values()])
                last_draw = time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired):
                next(iter(self.running.values())).proc.wait(timeout=0.05 if len(self.running) > 1 else 1.0)
