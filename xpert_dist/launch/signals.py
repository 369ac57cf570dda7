"""Graceful stop on SLURM's warning signals: set a flag, let the training loop checkpoint.

SLURM sends ``SIGUSR1`` ``N`` seconds before the time limit (``#SBATCH --signal=USR1@N``),
``SIGTERM`` on preemption/cancel (then ``SIGKILL`` after ``KillWait``), and submitit uses
``SIGUSR2``. The handlers installed by `install_handlers` only record the request; the loop
calls `stop_requested()` once per optimizer step, and when it is True writes a checkpoint
and raises `Preempted`. The launcher then exits with `EXIT_PREEMPTED` and the job is
requeued (``slurm/common.sh`` requeues on that exit code or when the marker file below
exists; ``xpert_dist.launch.jobs`` hands over to submitit's requeue).

`stop_requested()` is collective when ``torch.distributed`` is initialised with more than
one rank: every rank must call it at the same point of every step (it all-reduces the flag
with MAX so all ranks stop at the same step even when the signal reaches them at slightly
different times). Pass ``sync=False`` for a purely local check. When a peer rank is gone (its
process or node died), that all-reduce fails within the collective timeout
(``XPERT_DIST_TIMEOUT_S``) with a `DistributedError` naming the poll and this rank.

Environment:
    XPERT_PREEMPT_MARKER      a file to create when a stop signal arrives (the sbatch scripts
                              use it to decide on requeue even if the exit code got lost)
    XPERT_FAULT_PAUSE_AT_POLL test-only fault injection: at the N-th `stop_requested` call of
                              this process, block until a stop signal arrives (deterministic
                              place for a CI test to preempt a job from outside). Happens once:
    XPERT_FAULT_DIR           a folder; ``paused.rank<R>`` is created there when pausing, and
                              its existence prevents a second pause (after the requeue).
    XPERT_FAULT_PAUSE_TIMEOUT seconds to wait for the signal before carrying on (default 300).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None),
                                 signal.SIGTERM) if s is not None)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the sbatch scripts requeue on it


class Preempted(Exception):
    """Raised by the training loop after it saved a checkpoint because a stop was requested.

    ``Preempted("message", step=12, checkpoint="/out/checkpoints/step-000012")``; all optional.
    """

    def __init__(self, *args, step: int | None = None, checkpoint=None, signum: int | None = None):
        super().__init__(*(args or ("stop requested: checkpoint written, job should be requeued",)))
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum if signum is not None else received_signal()


class _State:
    flag = False
    signum: int | None = None
    at: float | None = None
    polls = 0
    previous: dict[int, object] = {}
    installed: set[int] = set()


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    first = not _State.flag
    _State.flag = True
    _State.signum = _State.signum or signum
    _State.at = _State.at or time.time()
    marker = os.environ.get("XPERT_PREEMPT_MARKER")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError:
            pass
    if first:
        name = signal.Signals(signum).name
        # os.write: safe even if the main thread was inside a print when the signal arrived
        try:
            os.write(2, f"[xpert_dist] received {name} (pid {os.getpid()}): will checkpoint and stop "
                        f"at the next step\n".encode())
        except OSError:
            pass


def install_handlers(signums=STOP_SIGNALS) -> bool:
    """Install the flag-setting handler for ``signums`` (SIGUSR1, SIGUSR2, SIGTERM).

    Idempotent. Remembers the handler that was there before (see `previous_handler`; submitit
    installs its own for SIGUSR2). Returns False (and does nothing) outside the main thread,
    where Python cannot install signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("install_handlers called outside the main thread: stop signals not handled")
        return False
    for s in signums:
        if s in _State.installed:
            continue
        _State.previous[s] = signal.getsignal(s)
        signal.signal(s, _handler)
        _State.installed.add(s)
    return True


def uninstall_handlers() -> None:
    """Put back the handlers that were there before `install_handlers`."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in list(_State.installed):
        prev = _State.previous.get(s)
        signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        _State.installed.discard(s)


def previous_handler(signum: int):
    """The handler that `install_handlers` replaced for ``signum`` (None if not replaced)."""
    return _State.previous.get(signum)


def received_signal() -> int | None:
    """The first stop signal received (None when the stop was requested programmatically or not at all)."""
    return _State.signum


def request_stop(reason: str = "requested") -> None:
    """Programmatic stop (same effect as a signal, without one)."""
    if not _State.flag:
        log.warning("stop requested: %s", reason)
    _State.flag = True
    _State.at = _State.at or time.time()


def reset() -> None:
    """Forget a received stop request (tests; a process that handled a stop and continues)."""
    _State.flag = False
    _State.signum = None
    _State.at = None
    _State.polls = 0


def _fault_pause() -> None:
    at = os.environ.get("XPERT_FAULT_PAUSE_AT_POLL")
    if not at or _State.polls != int(at) or _State.flag:
        return
    folder = os.environ.get("XPERT_FAULT_DIR") or "."
    marker = os.path.join(folder, f"paused.rank{os.environ.get('RANK', '0')}")
    if os.path.exists(marker):
        return
    os.makedirs(folder, exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    timeout = float(os.environ.get("XPERT_FAULT_PAUSE_TIMEOUT", "300"))
    os.write(2, f"[xpert_dist] fault injection: paused at poll {at}, waiting up to {timeout:.0f} s "
                f"for a stop signal\n".encode())
    deadline = time.monotonic() + timeout
    while not _State.flag and time.monotonic() < deadline:
        time.sleep(0.05)


def _all_reduce_max(flag: bool) -> bool:
    dist_mod = sys.modules.get("torch.distributed")
    if dist_mod is None or not dist_mod.is_available() or not dist_mod.is_initialized():
        return flag
    if dist_mod.get_world_size() <= 1:
        return flag
    import torch  # noqa: PLC0415 - already imported when torch.distributed is

    device = torch.device("cpu")
    if dist_mod.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    from ..distributed.comm import guard, timeout_seconds  # noqa: PLC0415 - only under torch.distributed

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    # a peer that died or whose node is gone: one clear DistributedError (exit 2) within the timeout
    with guard("stop-signal poll (all_reduce)", dist_mod.get_rank(), timeout_s=timeout_seconds()):
        dist_mod.all_reduce(t, op=dist_mod.ReduceOp.MAX)
    return bool(t.item())


def stop_requested(sync: bool = True) -> bool:
    """True once a stop signal (or `request_stop`) arrived on this rank or, with ``sync``, on any rank.

    Collective with ``sync=True`` under torch.distributed (see module doc). After it returned
    True once on a rank it stays True there.
    """
    _State.polls += 1
    _fault_pause()
    flag = _State.flag
    if sync:
        flag = _all_reduce_max(flag)
        if flag and not _State.flag:
            _State.flag = True  # a peer was signalled: remember it locally too
    return flag


def exit_code(exc: BaseException | None) -> int:
    """Process exit status for a launcher: `EXIT_PREEMPTED` for `Preempted`, 1 for other errors, 0 for None."""
    if exc is None:
        return 0
    return EXIT_PREEMPTED if isinstance(exc, Preempted) else 1
