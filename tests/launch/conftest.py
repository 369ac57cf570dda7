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


def _sinfo_ok() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (subprocess.SubprocessError, OSError):
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")
                                       for s in states)


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A responding SLURM cluster with accounting; brought up with .ci/slurm-up.sh if needed."""
    if not _sinfo_ok():
        if os.geteuid() != 0:
            pytest.skip("no SLURM cluster answers and not root: cannot run .ci/slurm-up.sh")
        proc = subprocess.run(["bash", str(REPO / ".ci" / "slurm-up.sh")], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0 or not _sinfo_ok():
            pytest.fail(f".ci/slurm-up.sh failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True)
    if acct.returncode != 0:
        pytest.fail(f"sacct does not work (accounting is required so failed jobs are seen): {acct.stderr}")
    return "debug"


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if not out.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id])
        raise AssertionError(f"job {job_id} still queued/running after {timeout} s")
    for _ in range(20):  # sacct records land a moment after the end
        st = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True,
                            text=True).stdout.split()
        if st and st[0] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"):
            return st[0]
        time.sleep(0.5)
    return st[0] if st else "UNKNOWN"


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
