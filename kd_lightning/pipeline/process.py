"""A stage's process and locks, and the background stages.

How ``kdl`` is started (own process group, parent-death signal, log, progress file), stopped (SIGTERM, then
SIGKILL), and kept to one process per stage and one stage per run folder.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TextIO

from kd_lightning.errors import require_writable_folder
from kd_lightning.pipeline.plan import describe_status
from kd_lightning.pipeline.report import Console
from kd_lightning.pipeline.schema import Interrupted, Ready, StageFailed, Step
from kd_lightning.pipeline.state import now

#: environment variable: the command that runs ``kdl`` (default: this interpreter, ``-m kd_lightning.cli``)
LAUNCHER_ENV = "KDL_PIPELINE_LAUNCHER"
#: seconds a stopped stage (Ctrl-C, end of pipeline) gets to exit after SIGTERM before SIGKILL
STOP_GRACE_S = 60.0
#: the lock a stage holds on its run folder (``<dir>/pipeline/run.lock``): one stage in a folder at a time
FOLDER_LOCK = "run.lock"


def launcher() -> list[str]:
    """The command that runs ``kdl`` (``$KDL_PIPELINE_LAUNCHER``, else this interpreter)."""
    custom = os.environ.get(LAUNCHER_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "kd_lightning.cli"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the stage gets SIGTERM if the pipeline dies (even by SIGKILL), so it saves and stops."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def exit_status(returncode: int) -> int:
    """A process's return code as a shell exit status (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def tail(path: str, n: int = 8) -> str:
    """The last ``n`` lines of a log, indented (under a failure message)."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[-n:]
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines)


def popen(step: Step, extra: list[str], log: TextIO) -> subprocess.Popen:
    """Start ``kdl <command> <argv> <extra>`` with its output in ``log``, in a process group of its own."""
    cmd = [*launcher(), step.command, *step.argv, *extra]
    log.write(f"\n=== kdl pipeline: stage {step.name!r} at {now()}\n=== {step.shown(extra)}\n")
    log.flush()
    from kd_lightning.progress import PROGRESS_ENV

    with contextlib.suppress(FileNotFoundError):
        os.remove(step.progress_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_ENV: os.path.abspath(step.progress_path)}
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # Ctrl-C reaches the pipeline only; it stops the stage cleanly
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to a running stage's process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to the stage's process group (kdl fit saves last.ckpt), SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


def lock(step: Step) -> contextlib.ExitStack:
    """The stage's locks, held until the returned stack closes; a second holder stops with a clear error.

    ``<dir>/pipeline/<name>.lock``: one process runs a stage at a time. ``<dir>/pipeline/run.lock``: one stage (of
    any pipeline, under any name, any command) runs in a folder at a time, so two pipelines never fit, test or write
    into one folder at once. Within one pipeline, stages that share a folder run one after the other (``--jobs``).
    """
    require_writable_folder(step.dir, f"stage {step.name!r} dir")
    state_dir = os.path.dirname(step.state_path)
    os.makedirs(state_dir, exist_ok=True)
    held = contextlib.ExitStack()
    try:
        held.enter_context(_flock(step, step.state_path.removesuffix(".json") + ".lock", "stage"))
        held.enter_context(_flock(step, os.path.join(state_dir, FOLDER_LOCK), "folder"))
    except BaseException:
        held.close()
        raise
    return held


@contextlib.contextmanager
def _flock(step: Step, path: str, kind: str) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid, _, stage = (f.read().strip() or "?").partition(" ")
            if kind == "stage":
                what = f"stage {step.name!r} is being run by another process (pid {pid})"
            else:
                other = f", stage {stage!r}" if stage else ""
                what = (
                    f"run folder {step.dir!r} is in use by another pipeline (pid {pid}{other}); "
                    f"stage {step.name!r} cannot run there at the same time"
                )
            raise StageFailed(step, 2, f"{what}; {f.name}") from None
        f.truncate(0)
        f.write(f"{os.getpid()} {step.name}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_ready(ready: Ready) -> bool:
    """Whether a background stage's ``ready`` check passes now."""
    if ready.file is not None:
        return os.path.exists(ready.file)
    try:
        with urllib.request.urlopen(str(ready.url), timeout=2) as r:  # noqa: S310 - the user's own URL
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Background:
    """The background stages of a pipeline (servers): started and waited for, then stopped when it ends."""

    def __init__(self, console: Console, interrupted: Callable[[], int | None]) -> None:
        self.console, self.interrupted = console, interrupted
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, TextIO] = {}
        self.steps: dict[str, Step] = {}

    def start(self, step: Step) -> None:
        """Start ``step`` and wait until its ``ready`` check passes; StageFailed if it exits or times out first."""
        os.makedirs(os.path.dirname(step.log_path), exist_ok=True)
        log = open(step.log_path, "a")  # noqa: SIM115 - kept open while the process runs
        self.logs[step.name], self.steps[step.name] = log, step
        t0 = time.monotonic()
        self.console.line(step, "starting", f"log: {step.log_path}", final=False)
        proc = popen(step, [], log)
        self.procs[step.name] = proc
        assert step.ready is not None
        target = step.ready.url or step.ready.file
        while True:
            if (signum := self.interrupted()) is not None:
                raise Interrupted(signum)
            if proc.poll() is not None:
                raise StageFailed(
                    step,
                    exit_status(proc.returncode),
                    f"background stage {step.name!r} exited with {describe_status(proc.returncode)} before "
                    f"{target} was ready; log: {step.log_path}",
                )
            if is_ready(step.ready):
                break
            if time.monotonic() - t0 > step.ready.timeout:
                stop(proc, grace=5)
                raise StageFailed(
                    step,
                    1,
                    f"background stage {step.name!r}: {target} not ready after {step.ready.timeout:g} s; "
                    f"log: {step.log_path}",
                )
            time.sleep(0.1)
        self.console.line(step, "started", f"background, ready in {time.monotonic() - t0:.1f} s (pid {proc.pid})")

    def stop_all(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            stop(proc, grace=10)
            self.logs[name].close()
            self.console.line(self.steps[name], "stopped", f"background ({describe_status(proc.returncode)})")
        self.procs.clear()
