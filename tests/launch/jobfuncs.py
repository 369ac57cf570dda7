"""Job code for the SLURM tests: small, pure Python, importable by the job processes."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from xpert_dist.launch import checkpoint_io, signals
from xpert_dist.launch.env import detect
from xpert_dist.launch.jobs import PreemptibleJob


def report_env() -> dict:
    """What a submitit task sees: the DistEnv detected from its environment."""
    d = detect()
    return {"rank": d.rank, "world_size": d.world_size, "local_rank": d.local_rank,
            "master_addr": d.master_addr, "master_port": d.master_port, "source": d.source,
            "job_id": os.environ.get("SLURM_JOB_ID")}


def fail_with_exception(reason: str) -> None:
    print(f"about to fail: {reason}", file=sys.stderr, flush=True)
    raise ValueError(reason)


def die_without_result(reason: str, code: int = 3) -> None:
    """Ends the process without letting submitit write a result (like an OOM kill or a segfault)."""
    print(f"fatal: {reason}", file=sys.stderr, flush=True)
    os._exit(code)


class CounterJob(PreemptibleJob):
    """Counts to ``n`` (``step_s`` per step); state in ``state_dir/checkpoints`` via checkpoint_io.

    Shaped like the pipeline: resumes from its latest complete checkpoint, polls
    stop_requested() every step, on a stop writes a checkpoint and raises Preempted.
    """

    def __init__(self, n: int, state_dir: str, step_s: float = 0.5) -> None:
        self.n, self.state_dir, self.step_s = n, state_dir, step_s

    def run(self) -> dict:
        root = Path(self.state_dir) / "checkpoints"
        latest = checkpoint_io.latest_complete(root, verify=True)
        state = json.loads((latest / "state.json").read_text()) if latest else {"i": 0, "starts": []}
        state["starts"].append({"i": state["i"], "job": os.environ.get("SLURM_JOB_ID"),
                                "restart": os.environ.get("SLURM_RESTART_COUNT", "0")})
        (Path(self.state_dir) / "progress").write_text(str(state["i"]))
        while state["i"] < self.n:
            time.sleep(self.step_s)
            state["i"] += 1
            (Path(self.state_dir) / "progress").write_text(str(state["i"]))
            if signals.stop_requested():
                snapshot = json.dumps(state)
                checkpoint_io.write_atomic_dir(root / f"step-{state['i']:06d}",
                                               lambda d: (d / "state.json").write_text(snapshot))
                raise signals.Preempted(f"stopped at {state['i']}", step=state["i"])
        return state


def gloo_all_reduce() -> dict:
    """Each task: rendezvous from its environment (env.init_from_environment), one gloo all_reduce of
    rank + 1; returns where it ran and what it got (the sum over ranks is the oracle)."""
    import socket

    import torch
    import torch.distributed as dist

    from xpert_dist.launch.env import init_from_environment

    d = init_from_environment(install_signal_handlers=False)
    dist.init_process_group("gloo", rank=d.rank, world_size=d.world_size)
    t = torch.tensor([float(d.rank + 1)])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return {"rank": d.rank, "world_size": d.world_size, "host": socket.gethostname(),
            "master": f"{d.master_addr}:{d.master_port}", "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "sum": t.item()}
