"""Run a function on N spawned ranks (torch.multiprocessing spawn, gloo, a free port each).

Each child gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, DS_ACCELERATOR=cpu,
OMP_NUM_THREADS=1, DeepSpeed's shm-op JIT build skipped, and reports ``fn(rank, world, *args)``
through a queue; the parent waits with a deadline and kills (by pid) any child still running.
"""
from __future__ import annotations

import os
import queue as _queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, q, args, env):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    os.environ.update(env or {})
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from xpert_dist.distributed.comm import skip_shm_op_build

    skip_shm_op_build()
    try:
        out = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out = ("err", (type(e).__name__, str(e), traceback.format_exc()))
    q.put((rank, out[0], out[1]))
    q.close()
    q.join_thread()
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 150.0, env: dict | None = None,
              allow_missing: set[int] | None = None) -> dict[int, tuple[str, object]]:
    """``{rank: ("ok", result) | ("err", (type, message, traceback))}``; ranks in ``allow_missing``
    may exit without reporting (they are expected to die)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, q, args, env), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, object]] = {}
    expected = set(range(world)) - set(allow_missing or ())
    deadline = time.time() + timeout
    try:
        while not expected <= set(results) and time.time() < deadline:
            try:
                r, status, payload = q.get(timeout=1.0)
                results[r] = (status, payload)
            except _queue.Empty:
                if all(not p.is_alive() for p in procs):
                    try:
                        while True:
                            r, status, payload = q.get(timeout=0.5)
                            results[r] = (status, payload)
                    except _queue.Empty:
                        break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, 9)
                p.join(timeout=5)
    missing = expected - set(results)
    if missing:
        raise AssertionError(f"ranks {sorted(missing)} did not report within {timeout} s: {results}")
    return results


def ok(results: dict) -> dict:
    """The results, asserting every rank succeeded (with the first failure's traceback)."""
    for r, (status, payload) in sorted(results.items()):
        if status != "ok":
            raise AssertionError(f"rank {r} failed: {payload[0]}: {payload[1]}\n{payload[2]}")
    return {r: payload for r, (_, payload) in results.items()}
