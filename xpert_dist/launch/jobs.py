"""submitit job classes that survive preemption and time limits, and failure reporting.

`PreemptibleJob` is a ``submitit.helpers.Checkpointable``: its ``checkpoint()`` resubmits the
same object, because the work it runs keeps its own state on disk (the pipeline resumes from
``output_dir/checkpoints``). What it adds to submitit's default handling: submitit's own
SIGUSR2 handler would requeue at once, interrupting whatever the job is doing; instead the
stop signals (USR1/USR2/TERM) only set the flag of `xpert_dist.launch.signals`, the work
polls it, writes its checkpoint and raises `Preempted`, and only then is submitit's handler
invoked to pickle the resubmission and ``scontrol requeue`` the job (on the rank 0 task;
other tasks wait for the requeue to end them).

`PipelineJob` runs ``xpert_dist.launch.runner.run_job`` (process group, then
``xpert_dist.train.pipeline.run``) on a config given as a dict (validated at submission). `wait_and_report` waits for jobs and, on failure, prints the job state, the
exception and the last lines of the job's stderr.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import submitit

from . import signals
from .env import init_from_environment

log = logging.getLogger(__name__)


def _usr_sig() -> int:
    try:
        return submitit.JobEnvironment()._usr_sig()  # noqa: SLF001 - the signal submitit listens to
    except Exception:  # noqa: BLE001 - not inside a submitit job
        return signal.SIGUSR2


class PreemptibleJob(submitit.helpers.Checkpointable):
    """Base class: override `run()`; it must poll `signals.stop_requested()` and raise
    `signals.Preempted` after saving its state (it is simply called again after the requeue)."""

    #: seconds a non-zero rank waits for rank 0's requeue to end the job
    requeue_grace_s: float = 120.0

    def run(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self) -> Any:
        # replace submitit's immediate-requeue USR2 handler by the flag (remembered for later)
        signals.reset()
        signals.install_handlers()
        init_from_environment()
        try:
            return self.run()
        except signals.Preempted as exc:
            return self._hand_over(exc)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption/timeout: resubmit this same object."""
        log.warning("%s: checkpoint requested, resubmitting (state is on disk)", type(self).__name__)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _hand_over(self, exc: signals.Preempted) -> Any:
        usr = _usr_sig()
        handler = signals.previous_handler(usr)
        if not os.environ.get("SUBMITIT_EXECUTOR") or not callable(handler):
            raise exc  # not under submitit: the caller decides
        print(f"[xpert_dist] preempted ({exc}); handing over to submitit for requeue", file=sys.stderr,
              flush=True)
        handler(usr, None)  # rank 0: checkpoint() + scontrol requeue + sys.exit; others return
        deadline = time.monotonic() + self.requeue_grace_s
        while time.monotonic() < deadline:  # non-zero ranks: the requeue kills this task
            time.sleep(1.0)
        raise exc


class PipelineJob(PreemptibleJob):
    """One prune-tune run of ``xpert_dist.train.pipeline.run`` (resumes from its checkpoints)."""

    def __init__(self, config: dict, label: str = "") -> None:
        self.config = config
        self.label = label

    @property
    def output_dir(self) -> str:
        return self.config.get("output_dir", "")

    def run(self) -> Any:
        from ..config import config_from_dict  # noqa: PLC0415
        from .runner import run_job  # noqa: PLC0415  (process group + pipeline.run)

        cfg = config_from_dict(self.config)
        return run_job(cfg, progress=False)

    def __repr__(self) -> str:
        return f"PipelineJob({self.label or self.output_dir!r})"


# ----------------------------------------------------------------------------- reporting

def tail(path: str | Path, lines: int = 30) -> str:
    """Last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


@dataclass
class Outcome:
    job_id: str
    label: str
    ok: bool
    state: str = ""
    result: Any = None
    error: str = ""
    log_tail: str = ""
    paths: dict = field(default_factory=dict)


def _state(job) -> str:
    """SLURM's state of the job (a fresh sacct query; submitit's cached one lags)."""
    try:
        return str(job.watcher.get_state(job.job_id, mode="force"))
    except Exception:  # noqa: BLE001 - accounting hiccups must not hide the result
        try:
            return str(job.state)
        except Exception:  # noqa: BLE001
            return "UNKNOWN"


_DEAD = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Preempted|Failure)\b.*")


def _summarise(exc: BaseException) -> str:
    """One line: the remote exception of a FailedJobError, or the head of other errors."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    remote = [ln for ln in lines if _EXC_LINE.match(ln)]
    text = remote[-1] if remote else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}"


def failure_reason(job, lines: int = 30) -> str:
    """The last lines of the job's stderr (all tasks' logs when several), for a failure message."""
    chunks = []
    n_tasks = max(1, int(getattr(job, "num_tasks", 1) or 1))
    for i in range(n_tasks):
        try:
            p = job.task(i).paths if n_tasks > 1 else job.paths
        except Exception:  # noqa: BLE001
            continue
        for path in (p.stderr, p.stdout):
            text = tail(path, lines)
            if text.strip():
                chunks.append(f"--- {path} (last {lines} lines) ---\n{text}")
                break
    return "\n".join(chunks)


def collect(job, label: str = "", all_tasks: bool = False, lines: int = 30) -> Outcome:
    """Result of a finished job as an `Outcome` (never raises for job failures).

    Multi-task jobs: rank 0's result, or every task's with ``all_tasks``."""
    out = Outcome(job_id=str(job.job_id), label=label, ok=False,
                  paths={"stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
    state = _state(job)
    if state.split()[0] in _DEAD and hasattr(job, "_results_timeout_s"):
        # SLURM says the job is over and it failed: do not wait submitit's 15 s for a result
        # pickle that will most likely never come (the log tail below gives the reason)
        job._results_timeout_s = min(job._results_timeout_s, 3)  # noqa: SLF001
    try:
        if int(getattr(job, "num_tasks", 1) or 1) > 1:  # submitit refuses result() then
            results = job.results()
            out.result = results if all_tasks else results[0]  # rank 0's
        else:
            out.result = job.results() if all_tasks else job.result()
        out.ok = True
    except Exception as e:  # noqa: BLE001 - FailedJobError, UncompletedJobError, ...
        out.error = _summarise(e)
        out.log_tail = failure_reason(job, lines)
    out.state = _state(job) if not out.ok else state
    if out.ok and out.state in ("RUNNING", "COMPLETING", "UNKNOWN"):
        out.state = "COMPLETED"  # the result is there; SLURM is still wrapping the job up
    if not out.ok and out.state in ("RUNNING", "COMPLETING", "UNKNOWN"):
        out.state = "FAILED (exception in the job)"
    return out


def format_failure(o: Outcome) -> str:
    head = f"job {o.job_id}{' (' + o.label + ')' if o.label else ''} FAILED, state {o.state}: {o.error}"
    return head + ("\n" + o.log_tail if o.log_tail else "")


def wait_and_report(jobs: Sequence, labels: Sequence[str] | None = None, *, poll_s: float = 2.0,
                    timeout_s: float | None = None, all_tasks: bool = False, lines: int = 30,
                    stream: TextIO | None = None) -> list[Outcome]:
    """Wait for ``jobs``; report each as soon as it ends (failures with the reason from its log).

    Relies on submitit's state polling (sacct with accounting), so a job that died without a
    result is reported as soon as SLURM knows. ``timeout_s``: give up waiting (the outcome of
    unfinished jobs is ``ok=False, state=<current>``, error 'still running').
    """
    stream = stream or sys.stderr
    labels = list(labels) if labels is not None else [""] * len(jobs)
    pending = dict(enumerate(jobs))
    outcomes: dict[int, Outcome] = {}
    start = time.monotonic()
    while pending:
        # submitit refreshes its sacct view every max(2 s, half the job's age): force it so that a
        # job that died without a result is reported within poll_s (one sacct call for all jobs)
        watchers = {id(w): w for w in (getattr(j, "watcher", None) for j in pending.values()) if w is not None}
        for w in watchers.values():
            try:
                w.update_if_long_enough(mode="force")
            except Exception:  # noqa: BLE001 - accounting hiccup: submitit retries later
                pass
        for i, job in list(pending.items()):
            if job.done():
                o = collect(job, labels[i], all_tasks=all_tasks, lines=lines)
                outcomes[i] = o
                del pending[i]
                if o.ok:
                    print(f"job {o.job_id}{' (' + o.label + ')' if o.label else ''} done ({o.state})",
                          file=stream, flush=True)
                else:
                    print(format_failure(o), file=stream, flush=True)
        if not pending:
            break
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            for i, job in pending.items():
                outcomes[i] = Outcome(job_id=str(job.job_id), label=labels[i], ok=False,
                                      state=_state(job), error=f"still running after {timeout_s:.0f} s")
                print(f"job {job.job_id}: still {outcomes[i].state} after {timeout_s:.0f} s", file=stream,
                      flush=True)
            break
        time.sleep(poll_s)
    return [outcomes[i] for i in range(len(jobs))]
