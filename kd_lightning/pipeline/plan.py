"""The decisions: skip, run or resume each stage, and why; which stages wait for which under ``--jobs``.

As doit's up-to-date checks, each decision carries its reason (what ``--dry-run`` prints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kd_lightning.pipeline.schema import Step
from kd_lightning.pipeline.state import State


@dataclass
class Decision:
    """What the planner decided for a stage, and why."""

    action: str  # skip | run | resume | blocked | start / idle (background) | off (not selected)
    reason: str
    missing: str | None = None  # blocked: the input that does not exist
    anew: bool = False  # run: a different run than the recorded one (config or inputs changed, or forced)


def describe_status(returncode: int) -> str:
    """``exit status 3``, or ``exit status 143 (killed by SIGTERM)`` for a process a signal ended."""
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"exit status {128 - returncode} (killed by {name})"
    return f"exit status {returncode}"


def dependencies(steps: list[Step]) -> dict[str, set[str]]:
    """For each stage, the earlier stages it waits for when stages run side by side.

    A stage waits for the stages it refers to (``${stage.attr}``), for the earlier stage with the same run folder
    (a test waits for the fit it joins), for the stages whose folder or artifact holds a plain path in its
    ``inputs``, and for every background stage before it (started, as without ``--jobs``, before the first later
    stage that runs). File order is one order that satisfies all of these, so one job runs the file's order.
    """
    deps: dict[str, set[str]] = {s.name: set() for s in steps}
    last_in_dir: dict[str, str] = {}
    background: set[str] = set()
    for i, step in enumerate(steps):
        wait = deps[step.name]
        wait |= {ref.split(".", 1)[0] for ref in step.refs}
        for path in step.paths:
            for earlier in steps[:i]:
                folder = os.path.abspath(earlier.dir)
                if path in earlier.artifacts.values() or os.path.abspath(path).startswith(folder + os.sep):
                    wait.add(earlier.name)
        if step.dir in last_in_dir:
            wait.add(last_in_dir[step.dir])
        last_in_dir[step.dir] = step.name
        wait |= background
        if step.background:
            background.add(step.name)
    return deps


class Planner(State):
    """Skip / run / resume decisions over the stages' records (``selected``: the stages --only/--from chose)."""

    def __init__(self, steps: list[Step], selected: set[str] | None = None, force: bool = False) -> None:
        super().__init__(steps)
        self.steps = steps
        self.selected = set(selected) if selected is not None else {s.name for s in steps}
        self.force = force

    def decide(self, step: Step, rebuilt: set[str] | None = None) -> Decision:
        """Skip, run or resume ``step``, and why. ``rebuilt``: earlier stages that will run first (dry run)."""
        if step.background:  # plan() settles start / idle / off from the stages after it
            return Decision("start", "background: starts before the first later stage that runs")
        if step.name not in self.selected:
            return Decision("off", "not selected")
        for ref in step.refs:
            producer = ref.split(".", 1)[0]
            if rebuilt and producer in rebuilt:
                return Decision("run", f"input {ref} is rebuilt by stage {producer!r} first", anew=True)
        inputs = self.input_hashes(step)
        missing = [k for k, v in inputs.items() if v is None]
        if missing:
            k = missing[0]
            if k in step.refs:
                name, attr = k.split(".", 1)
                what = self.by_name[name].artifacts[attr]
                done = (self.records.get(name) or {}).get("status") == "done"
                hint = (
                    f"stage {name!r} is done but left no such file (rerun it: --only {name} --force)"
                    if done
                    else f"run stage {name!r} first"
                )
                return Decision("blocked", f"input {k} ({what}) does not exist; {hint}", k)
            return Decision("blocked", f"input {k} does not exist", k)
        rec = self.records.get(step.name)
        if self.force:
            return Decision("run", "forced (--force)", anew=True)
        if rec is None:
            return Decision("run", "no previous run")
        if rec.get("config_hash") != step.config_hash:
            diff = self._config_diff(rec.get("spec") or {}, step.spec)
            return Decision("run", f"config changed: {diff}", anew=True)
        old_inputs = rec.get("inputs") or {}
        changed = [k for k in inputs if old_inputs.get(k) != inputs[k]] + [k for k in old_inputs if k not in inputs]
        if changed:
            more = f" (+{len(changed) - 1} more)" if changed[1:] else ""
            return Decision("run", f"input {changed[0]} changed{more}", anew=True)
        status = rec.get("status")
        if status != "done":
            last = step.artifacts.get("last")
            started = float(rec.get("run_started") or 0)
            if step.command == "fit" and last and os.path.isfile(last) and os.path.getmtime(last) >= started - 1:
                when = rec.get("finished") or rec.get("started")
                return Decision("resume", f"{status} ({when}); resumes from {last}")
            how = f" ({describe_status(rec['returncode'])})" if rec.get("returncode") else ""
            made_by = rec.get("made_by")  # the config and inputs of the last run that finished
            other = bool(made_by) and made_by != {"config_hash": step.config_hash, "inputs": inputs}
            made = "; the outputs there were made with another config or inputs" if other else ""
            return Decision("run", f"previous run {status}{how}{made}", anew=other)
        recorded = [o["path"] for o in (rec.get("outputs") or {}).values() if isinstance(o, dict) and "path" in o]
        gone = [p for p in dict.fromkeys(step.required + recorded) if not os.path.exists(p)]
        if gone:
            return Decision("run", f"output {gone[0]} is missing")
        return Decision("skip", f"done {rec.get('finished', '')}, same config and inputs")

    @staticmethod
    def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
        from kd_lightning.callbacks.resume import config_differences

        diffs = config_differences(old, new, ignore=())
        if not diffs:
            return "(record from another version)"
        shown = ", ".join(f"{k.removeprefix('config.')} {a!r} -> {b!r}" for k, a, b in diffs[:3])
        return shown + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")

    def plan(self) -> list[tuple[Step, Decision]]:
        """Every stage's decision before anything runs (``--dry-run``)."""
        rebuilt: set[str] = set()
        rows = []
        for step in self.steps:
            d = self.decide(step, rebuilt)
            if d.action in ("run", "resume", "blocked"):
                rebuilt.add(step.name)
            elif d.action == "start" and any(ref.split(".", 1)[0] in rebuilt for ref in step.refs):
                rebuilt.add(step.name)  # a server of a checkpoint that is rebuilt first is new to its clients
            rows.append((step, d))
        for i, (step, d) in enumerate(rows):
            if d.action != "start":
                continue
            chosen = step.name in self.selected
            users = [
                later
                for later, dl in rows[i + 1 :]
                if dl.action in ("run", "resume") and (chosen or step.name in {r.split(".", 1)[0] for r in later.refs})
            ]
            if users:
                continue
            if chosen:
                rows[i] = (step, Decision("idle", "background: not started, no later stage runs"))
            else:
                rows[i] = (step, Decision("off", "not selected, and no stage that runs reads it"))
        return rows

    @staticmethod
    def replaced(step: Step, decision: Decision) -> list[str]:
        """The outputs an ``overwrite`` stage deletes before this run (those that exist)."""
        if not (step.overwrite and decision.action == "run" and decision.anew):
            return []
        return [step.artifacts[k] for k in step.spec["outputs"] if os.path.lexists(step.artifacts[k])]
