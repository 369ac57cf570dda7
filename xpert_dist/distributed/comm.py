"""Process-group set-up and failure handling shared by the distributed contexts.

* ``init_distributed()`` starts torch.distributed (through DeepSpeed when it is installed, so that
  ``deepspeed.comm`` is usable too) from the usual environment variables, with a bounded
  collective timeout, and on CPU skips DeepSpeed's ~35 s shared-memory op JIT build that nothing
  here uses (docs INFRA.md).
* ``guard(op, rank)`` turns any failure inside a collective (a dead peer: "Connection closed by
  peer", a timeout, a backend error) into :class:`xpert_dist.errors.DistributedError` naming the
  operation and the rank, so every surviving rank fails with one recognisable error instead of
  hanging or dying with a backend traceback.
* ``PhaseBoard``: each rank posts the phase it is in (``"export"``, ``"prune step 2"``) to the
  process group's key-value store, out of band (not a collective). When a collective fails, the
  error names this rank's phase and each peer's last posted one, e.g. "rank 1 in 'waiting after
  export'; rank 0 last posted 'export' 61 s ago", instead of only "a peer died".

Timeout: ``timeout_s`` argument, else ``XPERT_DIST_TIMEOUT_S``, else 60 s. It bounds how long a
rank waits in one collective of the xpert process group for a peer that stopped answering.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time

import torch

from ..errors import DistributedError, XpertError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "XPERT_DIST_TIMEOUT_S"


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The collective timeout in seconds: argument, else $XPERT_DIST_TIMEOUT_S, else 60."""
    if timeout_s is not None:
        value = float(timeout_s)
    else:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise DistributedError(f"collective timeout must be > 0 seconds, got {value}")
    return value


def skip_shm_op_build() -> None:
    """Stop DeepSpeed's CPU ``init_distributed`` from JIT-compiling its shm comm op (~35 s).

    The patch must go into the module object in ``sys.modules``: ``import deepspeed.comm.torch as m``
    binds the torch package instead (deepspeed.comm re-exports ``torch``), see INFRA.md.
    """
    try:
        import deepspeed.comm.torch  # noqa: F401
    except Exception:  # deepspeed absent or broken: nothing to skip
        return
    mod = sys.modules.get("deepspeed.comm.torch")
    if mod is not None and hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda *a, **k: None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float | None = None,
                     use_deepspeed: bool = True) -> None:
    """Initialise the default process group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (idempotent)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"cannot start torch.distributed: environment variable(s) {', '.join(missing)} "
                               "not set (launch with torchrun/deepspeed/srun, or set them)")
    backend = backend or default_backend()
    timeout = datetime.timedelta(seconds=timeout_seconds(timeout_s))
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        if use_deepspeed:
            try:
                import deepspeed
            except ImportError:
                deepspeed = None
            if deepspeed is not None:
                if backend == "gloo":
                    skip_shm_op_build()
                deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
                return
        dist.init_process_group(backend=backend, timeout=timeout)
    except XpertError:
        raise
    except Exception as e:
        raise DistributedError(f"init_distributed ({backend}) failed on rank {os.environ.get('RANK')}: {e}") from e


class PhaseBoard:
    """The phase each rank is in, posted to the default process group's key-value store.

    Posting is one small ``store.set`` (no collective, no peer needs to answer), so it is safe on
    one rank only and cheap enough for every prune step and export phase. ``describe()`` reads the
    peers' last posts without blocking (``store.check`` first); a store that cannot be reached any
    more (its host died) gives "unknown" rather than a second error.
    """

    PREFIX = "xpert_phase/"

    def __init__(self, rank: int, world_size: int, store=None):
        self.rank, self.world_size = rank, world_size
        self.phase = "start"
        self.store = store if store is not None else _default_store()

    def post(self, phase: str) -> None:
        self.phase = phase
        if self.store is None:
            return
        try:
            self.store.set(f"{self.PREFIX}{self.rank}", f"{time.time():.3f}|{phase}")
        except Exception:  # the store is best-effort diagnostics; a dead host shows up in the collective
            pass

    def peer_phases(self) -> dict[int, tuple[str, float | None]]:
        """{rank: (last posted phase, seconds since it was posted)} for the other ranks."""
        out: dict[int, tuple[str, float | None]] = {}
        for r in range(self.world_size):
            if r == self.rank:
                continue
            key = f"{self.PREFIX}{r}"
            try:
                if self.store is None or not self.store.check([key]):
                    out[r] = ("unknown (nothing posted)", None)
                    continue
                stamp, _, phase = self.store.get(key).decode().partition("|")
                out[r] = (phase, max(0.0, time.time() - float(stamp)))
            except Exception:
                out[r] = ("unknown (store unreachable)", None)
        return out

    @contextlib.contextmanager
    def working(self, phase: str, every_s: float = 5.0):
        """Run one-rank work (export, evaluation) while a thread re-posts ``phase`` every
        ``every_s`` seconds (a heartbeat the waiting ranks watch), then post it done."""
        import threading

        self.post(phase)
        stop = threading.Event()

        def beat():
            while not stop.wait(every_s):
                self.post(phase)

        thread = threading.Thread(target=beat, name=f"xpert-heartbeat-{phase}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        self.post(f"done {phase}")
        if self.store is not None:
            try:
                self.store.set(f"xpert_done/{phase}/{self.rank}", "1")
            except Exception:
                pass

    def wait_done(self, phase: str, src: int, timeout_s: float, poll_s: float = 0.2) -> None:
        """Wait (without a collective) until rank ``src`` finishes ``working(phase)``; fail when its
        heartbeat is older than ``timeout_s`` (it died, or hangs) or the store is gone."""
        self.post(f"waiting for rank {src} to finish {phase}")
        if self.store is None:
            raise DistributedError(f"rank {self.rank}: no key-value store to wait for rank {src}'s {phase}")
        key, beat_key = f"xpert_done/{phase}/{src}", f"{self.PREFIX}{src}"
        t0 = time.time()
        while True:
            try:
                if self.store.check([key]):
                    return
                if self.store.check([beat_key]):
                    stamp = float(self.store.get(beat_key).decode().partition("|")[0])
                else:
                    stamp = t0
            except Exception as e:
                raise DistributedError(f"rank {self.rank} waiting for rank {src} to finish {phase}: the "
                                       f"process group's store is unreachable, rank {src} (or its host) "
                                       f"probably died ({type(e).__name__}: {e})") from e
            if time.time() - max(stamp, t0) > timeout_s:
                raise DistributedError(f"rank {self.rank} waiting for rank {src} to finish {phase}: no sign "
                                       f"of life for {timeout_s:g} s [{self.describe()}]")
            time.sleep(poll_s)

    def describe(self) -> str:
        parts = [f"rank {self.rank} in '{self.phase}'"]
        for r, (phase, age) in self.peer_phases().items():
            parts.append(f"rank {r} last posted '{phase}'" + (f" {age:.0f} s ago" if age is not None else ""))
        return "; ".join(parts)


def _default_store():
    try:
        import torch.distributed as dist

        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:
        return None


_BOARD: list[PhaseBoard] = []  # the process's phase board (one process group per process), see guard()


def set_phase_board(board: PhaseBoard | None) -> None:
    _BOARD[:] = [board] if board is not None else []


@contextlib.contextmanager
def guard(op: str, rank: int, peer: int | None = None, timeout_s: float | None = None):
    """Convert a failure inside ``op`` into DistributedError naming ``op``, this rank and the peer,
    and (with a phase board) the phase of every rank."""
    try:
        yield
    except XpertError:
        raise
    except Exception as e:  # RuntimeError / DistBackendError / DistNetworkError / ValueError from gloo/nccl
        who = f" with peer rank {peer}" if peer is not None else ""
        limit = f" (timeout {timeout_s:g} s)" if timeout_s else ""
        where = f" [{_BOARD[0].describe()}]" if _BOARD else ""
        raise DistributedError(f"{op} failed on rank {rank}{who}{limit}: a peer rank died or stopped "
                               f"answering{where} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from e


def message_dtype(name: str) -> torch.dtype:
    """The torch dtype a distributed message names (``"torch.float32"`` or ``"float32"``)."""
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise DistributedError(f"unknown dtype {name!r} in a distributed message")
    return dt
