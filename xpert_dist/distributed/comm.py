"""Process-group set-up and failure handling shared by the distributed contexts.

* ``init_distributed()`` starts torch.distributed (through DeepSpeed when it is installed, so that
  ``deepspeed.comm`` is usable too) from the usual environment variables, with a bounded
  collective timeout, and on CPU skips DeepSpeed's ~35 s shared-memory op JIT build that nothing
  here uses (docs INFRA.md).
* ``guard(op, rank)`` turns any failure inside a collective (a dead peer: "Connection closed by
  peer", a timeout, a backend error) into :class:`xpert_dist.errors.DistributedError` naming the
  operation and the rank, so every surviving rank fails with one recognisable error instead of
  hanging or dying with a backend traceback.

Timeout: ``timeout_s`` argument, else ``XPERT_DIST_TIMEOUT_S``, else 60 s. It bounds how long a
rank waits in one collective of the xpert process group for a peer that stopped answering.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys

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


@contextlib.contextmanager
def guard(op: str, rank: int, peer: int | None = None, timeout_s: float | None = None):
    """Convert a failure inside ``op`` into DistributedError naming ``op``, this rank and the peer."""
    try:
        yield
    except XpertError:
        raise
    except Exception as e:  # RuntimeError / DistBackendError / DistNetworkError / ValueError from gloo/nccl
        who = f" with peer rank {peer}" if peer is not None else ""
        limit = f" (timeout {timeout_s:g} s)" if timeout_s else ""
        raise DistributedError(f"{op} failed on rank {rank}{who}{limit}: a peer rank died or stopped "
                               f"answering ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
