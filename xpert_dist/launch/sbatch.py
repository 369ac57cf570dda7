"""Submit the sbatch scripts of ``slurm/`` with a chosen layout, wait for them, read their state.

The layouts of the reproducibility matrix, on the local cluster of ``.ci/slurm-up.sh``:

    "1"    one process           partition debug (the host node)
    "1x2"  one node x 2 ranks    partition debug
    "2x1"  two nodes x 1 rank    partition multi (namespace nodes xn1, xn2)

``NxT`` in general (N nodes, T ranks per node). One-node layouts go to ``debug``, multi-node ones
to ``multi`` unless a partition is given. The script's own ``#SBATCH`` lines supply everything
else (time, memory, ``--requeue``, ``--signal``); the options passed here override them.

    from xpert_dist.launch import sbatch
    job = sbatch.submit("slurm/cpu_tiny.sh", ["cfg.json", "output_dir=/tmp/x"], layout="2x1",
                        log="/tmp/x.out", ds_config="ds_configs/zero3.json")
    state = sbatch.wait(job, timeout_s=300)            # "COMPLETED", "FAILED", ...
    sbatch.restarts(job)                               # how often it was requeued
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LOCAL_PARTITIONS = {"single": "debug", "multi": "multi"}   # .ci/slurm-up.sh
FINAL_STATES_PENDING = ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING")


@dataclass(frozen=True)
class Layout:
    nodes: int
    tasks_per_node: int
    partition: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def label(self) -> str:
        return "1" if self.world_size == 1 else f"{self.nodes}x{self.tasks_per_node}"

    def sbatch_options(self) -> list[str]:
        return [f"--partition={self.partition}", f"--nodes={self.nodes}",
                f"--ntasks-per-node={self.tasks_per_node}"]


def parse_layout(spec: str, partition: str | None = None) -> Layout:
    """``"1"``, ``"1x2"``, ``"2x1"``, ``"NxT"`` -> `Layout` (partition: see module doc)."""
    s = str(spec).strip().lower()
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", s)
    if not m:
        raise ConfigError(f"layout {spec!r}: use 1, NxT (nodes x ranks per node), e.g. 1x2 or 2x1")
    if m.group(2) is None:  # "1": one process; "4": 4 ranks on one node
        nodes, tpn = 1, int(m.group(1))
    else:
        nodes, tpn = int(m.group(1)), int(m.group(2))
    if nodes < 1 or tpn < 1:
        raise ConfigError(f"layout {spec!r}: nodes and ranks per node must be >= 1")
    part = partition or LOCAL_PARTITIONS["single" if nodes == 1 else "multi"]
    return Layout(nodes, tpn, part)


def submit(script: str | Path, args: list[str], *, layout: str | Layout = "1x2", log: str | Path,
           ds_config: str | None = None, env: dict | None = None, extra: list[str] | None = None,
           python: str | None = None) -> str:
    """``sbatch --parsable`` the script with ``args`` (config, then overrides); returns the job id.

    ``ds_config``: exported as DS_CONFIG (the scripts' ZeRO JSON); ``env``: the environment to
    submit from (default: this one; sbatch exports it to the job); ``extra``: more sbatch options
    (e.g. ``--no-requeue``). PYTHON defaults to this interpreter, PYTHONPATH includes the repository.
    """
    lay = layout if isinstance(layout, Layout) else parse_layout(layout)
    environ = dict(os.environ if env is None else env)
    environ["PYTHON"] = python or environ.get("PYTHON") or sys.executable
    environ["PYTHONPATH"] = str(REPO) + (os.pathsep + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    if ds_config is not None:
        environ["DS_CONFIG"] = ds_config
    cmd = ["sbatch", "--parsable", f"--output={log}", *lay.sbatch_options(), *(extra or []),
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=REPO, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def queue_state(job_id: str) -> str:
    """The job's state in ``squeue`` ("" once it left the queue)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def final_state(job_id: str, tries: int = 20) -> str:
    """The job's state from ``sacct`` once it is final (records land a moment after the end)."""
    st: list[str] = []
    for _ in range(tries):
        st = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True,
                            text=True).stdout.split()
        if st and st[0] not in FINAL_STATES_PENDING:
            return st[0]
        time.sleep(0.5)
    return st[0] if st else "UNKNOWN"


def wait(job_id: str, timeout_s: float, cancel_on_timeout: bool = True) -> str:
    """Wait until SLURM no longer lists ``job_id``; return its final sacct state.

    After ``timeout_s`` the job is cancelled (unless ``cancel_on_timeout=False``) and
    TimeoutError raised.
    """
    deadline = time.monotonic() + timeout_s
    while queue_state(job_id):
        if time.monotonic() > deadline:
            if cancel_on_timeout:
                subprocess.run(["scancel", job_id])
            raise TimeoutError(f"job {job_id} still queued/running after {timeout_s} s")
        time.sleep(1)
    return final_state(job_id)


def restarts(job_id: str) -> int:
    """How many times SLURM restarted (requeued) the job (``Restarts=`` of scontrol; needs the
    job still known to slurmctld, i.e. within MinJobAge of its end)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    m = re.search(r"Restarts=(\d+)", out)
    return int(m.group(1)) if m else 0


def nodes_of(job_id: str) -> list[str]:
    """The hosts the job ran on (sacct NodeList, expanded)."""
    from .env import scontrol_hostnames  # noqa: PLC0415

    out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "NodeList%200"], capture_output=True,
                         text=True).stdout.split()
    return scontrol_hostnames(out[0]) if out else []
