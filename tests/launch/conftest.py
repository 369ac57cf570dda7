"""Fixtures for tests/launch: the real local SLURM cluster and tiny run configs.

The cluster fixture checks that `sinfo` answers and otherwise runs .ci/slurm-up.sh (root, Debian);
tests that need it are skipped with the reason when that is impossible.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_DATA = "/work/shared/data/health/medquad_train.jsonl"


USABLE = ("idle", "mixed", "allocated", "completing")
MULTI_PARTITION, MULTI_NODES = "multi", ("xn1", "xn2")   # .ci/slurm-up.sh


def _sinfo_ok(partition: str | None = None, nodes: int = 1) -> bool:
    """At least ``nodes`` usable nodes answer (in ``partition`` if given)."""
    if not shutil.which("sinfo"):
        return False
    cmd = ["sinfo", "-h", "-N", "-o", "%N %T"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (subprocess.SubprocessError, OSError):
        return False
    usable = {line.split()[0] for line in out.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1] in USABLE}
    return out.returncode == 0 and len(usable) >= nodes


def slurm_up() -> subprocess.CompletedProcess:
    """Run .ci/slurm-up.sh (idempotent: starts what is missing, e.g. a crashed namespace node)."""
    return subprocess.run(["bash", str(REPO / ".ci" / "slurm-up.sh")], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A responding SLURM cluster with accounting; brought up with .ci/slurm-up.sh if needed."""
    if not _sinfo_ok():
        if os.geteuid() != 0:
            pytest.skip("no SLURM cluster answers and not root: cannot run .ci/slurm-up.sh")
        proc = slurm_up()
        if proc.returncode != 0 or not _sinfo_ok():
            pytest.fail(f".ci/slurm-up.sh failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True)
    if acct.returncode != 0:
        pytest.fail(f"sacct does not work (accounting is required so failed jobs are seen): {acct.stderr}")
    return "debug"


@pytest.fixture(scope="session")
def multinode_cluster(slurm_cluster) -> str:
    """The two namespace nodes xn1, xn2 (partition multi) of .ci/slurm-up.sh, usable."""
    if not _sinfo_ok(MULTI_PARTITION, len(MULTI_NODES)):
        if os.geteuid() != 0:
            pytest.skip("partition multi (two namespace nodes) is not up and not root: "
                        "cannot run .ci/slurm-up.sh")
        proc = slurm_up()  # adds/restarts the namespace nodes (an older one-node cluster is upgraded)
        if proc.returncode != 0 or not _sinfo_ok(MULTI_PARTITION, len(MULTI_NODES)):
            pytest.fail(f"partition {MULTI_PARTITION} with nodes {MULTI_NODES} not usable after "
                        f".ci/slurm-up.sh (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return MULTI_PARTITION


@pytest.fixture()
def submitit_folder(tmp_path) -> Path:
    # a fresh folder per test: job ids restart at 1 when the cluster is recreated
    return tmp_path / "submitit" / "%j"


def tiny_config(output_dir: Path, **sections) -> dict:
    cfg = {"model": {"tiny": {}},
           "data": {"train": TRAIN_DATA, "seq_len": 32, "max_train_samples": 64, "calib_samples": 8},
           "train": {"max_steps": 6, "batch_size": 2},
           "prune": {"sparsity": 0.5, "schedule": "steps", "prune_every": 3},
           "eval": {"perplexity_windows": 2, "tasks": []},
           "output_dir": str(output_dir)}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def wait_job(job_id: str, timeout: float) -> str:
    """Wait until SLURM no longer lists ``job_id``; return its final state from sacct."""
    from xpert_dist.launch import sbatch

    try:
        return sbatch.wait(job_id, timeout)
    except TimeoutError as e:
        raise AssertionError(str(e)) from None


class RunClock:
    """Seconds a job has spent out of the PENDING state so far: on a shared machine a job may wait
    in the queue behind other jobs, which should not count against a test's time limit."""

    def __init__(self, job_id: str) -> None:
        self.job_id, self.ran, self.last = str(job_id), 0.0, time.monotonic()

    def __call__(self) -> float:
        from xpert_dist.launch import sbatch

        now = time.monotonic()
        if sbatch.queue_state(self.job_id) not in ("PENDING", ""):
            self.ran += now - self.last
        self.last = now
        return self.ran


def wait_for_markers(job_id: str, markers: list[Path], log: Path, run_timeout: float = 180,
                     queue_timeout: float = 1200) -> None:
    """Wait until every file in ``markers`` exists (the job's ranks reached a fault point); only
    running time counts against ``run_timeout`` (`RunClock`), ``queue_timeout`` bounds the whole wait."""
    from xpert_dist.launch import sbatch

    clock, hard = RunClock(job_id), time.monotonic() + queue_timeout
    tail = lambda: log.read_text()[-3000:] if log.exists() else "(no log yet)"  # noqa: E731
    while not all(m.exists() for m in markers):
        assert sbatch.queue_state(job_id), f"job {job_id} ended before the fault point:\n{tail()}"
        assert clock() < run_timeout and time.monotonic() < hard, \
            f"job {job_id} did not reach the fault point in {run_timeout} s of running:\n{tail()}"
        time.sleep(0.25)


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
