"""Rank functions for tests/distributed/test_phases.py (spawned by tests/distributed/harness.py)."""
from __future__ import annotations

import os
import time


def _ctx():
    from xpert_dist.distributed.multirank import TorchDistContext

    return TorchDistContext(zero3=False)


def stuck_peer(rank, world):
    """Rank 0 enters 'export' and never reaches the barrier in time; rank 1 waits at it."""
    from xpert_dist.errors import DistributedError

    ctx = _ctx()
    ctx.phase("final prune")
    if rank == 0:
        ctx.phase("export")
        time.sleep(float(os.environ["XPERT_DIST_TIMEOUT_S"]) + 6)
        return "slept"
    try:
        ctx.barrier(after="final prune")
    except DistributedError as e:
        return str(e)
    return "no error"


def long_one_rank_work(rank, world, seconds: float):
    """Rank 0 works longer than the collective timeout inside one_rank(); the others wait for it."""
    ctx = _ctx()
    t0 = time.time()
    with ctx.one_rank("evaluation"):
        if rank == 0:
            time.sleep(seconds)
    ctx.wait_for("evaluation")
    waited = time.time() - t0
    ctx.barrier(after="evaluation")
    return waited


def dies_in_one_rank_work(rank, world):
    """Rank 0 dies during one_rank('export'); rank 1 must fail within the timeout, naming the phase."""
    from xpert_dist.errors import DistributedError

    ctx = _ctx()
    ctx.barrier(after="setup")
    with ctx.one_rank("export"):
        if rank == 0:
            time.sleep(1.0)
            os._exit(3)
    t0 = time.time()
    try:
        ctx.wait_for("export")
    except DistributedError as e:
        return {"error": str(e), "after_s": time.time() - t0}
    return {"error": None, "after_s": time.time() - t0}
