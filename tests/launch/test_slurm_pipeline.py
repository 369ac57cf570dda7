"""The real pipeline on the local SLURM cluster (contract: launchers/run.py, manifest.json).

* ``sbatch slurm/cpu_tiny.sh`` (2 ranks, gloo) gives the same mask hashes as one local process
  with the same config (``train.batch_size`` is the global batch, so both read the same rows per
  step; see xpert_dist/train/data.py) and LoRA dropout off (outside train.reproducible its noise
  is drawn per rank, so it cannot match across world sizes).
* The same 2-rank job, preempted (``scancel --signal=USR1``, as SLURM does before the time
  limit) after step 4, checkpoints, requeues itself and resumes: its final masks equal the
  uninterrupted run's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, RunClock, python_env, tiny_config, wait_for_markers, wait_job, write_config

GLOBAL_BATCH = 4  # train.batch_size: rows per optimizer step, all ranks together
RANKS = 2


def manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    assert path.is_file(), f"{run_dir} has no manifest.json"
    return json.loads(path.read_text())


def sbatch(config: Path, log: Path, env: dict | None = None, *overrides: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(REPO / "slurm" / "cpu_tiny.sh"),
                           str(config), *overrides], capture_output=True, text=True, env=env or python_env(),
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def pipeline_ready():
    import importlib

    try:
        for name in ("xpert_dist.train.pipeline", "xpert_dist.launch.runner"):
            importlib.import_module(name)
    except ImportError as e:  # the pipeline is written against the same contract
        pytest.fail(f"pipeline not importable yet: {e}")


@pytest.fixture(scope="module")
def reference_runs(slurm_cluster, pipeline_ready, tmp_path_factory):
    """An uninterrupted 2-rank SLURM run and the equivalent single local process, run concurrently."""
    root = tmp_path_factory.mktemp("pipeline")
    # lora.dropout=0: dropout draws its noise per rank, so with dropout the batches of 2 ranks and of
    # 1 process see different noise and only the dropout-free computation can match bit for bit
    cfg = write_config(root / "tiny.json", tiny_config(root / "slurm2", train={"batch_size": GLOBAL_BATCH},
                                                       lora={"dropout": 0.0}))
    local_dir = root / "local1"
    local = subprocess.Popen([sys.executable, str(REPO / "launchers" / "run.py"), "--config", str(cfg), "--no-progress",
                              f"output_dir={local_dir}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=python_env())
    log = root / "slurm2.out"
    job = sbatch(cfg, log)
    state = wait_job(job, timeout=240)
    local_out, _ = local.communicate(timeout=240)
    assert local.returncode == 0, local_out[-3000:]
    assert state == "COMPLETED", f"job {job}: {state}\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}"
    return {"config": cfg, "root": root, "slurm": root / "slurm2", "local": local_dir, "log": log}


def test_two_rank_sbatch_job_matches_single_process(reference_runs):
    ms, ml = manifest(reference_runs["slurm"]), manifest(reference_runs["local"])
    assert ms.get("world_size") == RANKS and ml.get("world_size") == 1
    assert ms["mask_sha256"], "no masks in the manifest"
    differ = sorted(k for k in set(ms["mask_sha256"]) | set(ml["mask_sha256"])
                    if ms["mask_sha256"].get(k) != ml["mask_sha256"].get(k))
    assert not differ, (f"{len(differ)} of {len(ms['mask_sha256'])} masks differ between {RANKS} ranks x "
                        f"batch {GLOBAL_BATCH // RANKS} and 1 process x batch {GLOBAL_BATCH}: {differ[:4]}; "
                        f"final loss {ms.get('final_loss')} vs {ml.get('final_loss')}")
    log = reference_runs["log"].read_text(errors="replace")
    assert "2 rank(s), master" in log and "srun finished with status 0" in log


def test_preempted_job_requeues_and_resumes_with_identical_masks(reference_runs, tmp_path):
    out_dir = tmp_path / "preempted"
    fault = tmp_path / "fault"
    env = python_env()
    env.update(XPERT_FAULT_PAUSE_AT_POLL="4", XPERT_FAULT_DIR=str(fault), XPERT_FAULT_PAUSE_TIMEOUT="120")
    log = tmp_path / "preempted.out"
    job = sbatch(reference_runs["config"], log, env, f"output_dir={out_dir}")
    # every rank is inside step 4's stop poll (time queued behind other jobs does not count)
    wait_for_markers(job, [fault / f"paused.rank{r}" for r in range(RANKS)], log, run_timeout=180)
    # what SLURM does --signal=USR1@N before the time limit: USR1 to every rank
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_job(job, timeout=300)
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-4000:]}"
    assert "preempted: requeueing job" in text, text[-3000:]
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts or "restart 1)" in text
    ms, mp = manifest(reference_runs["slurm"]), manifest(out_dir)
    differ = sorted(k for k in set(ms["mask_sha256"]) | set(mp["mask_sha256"])
                    if ms["mask_sha256"].get(k) != mp["mask_sha256"].get(k))
    assert ms["mask_sha256"] and not differ, f"masks differ after resume: {differ[:4]}"
    assert mp["final_loss"] == pytest.approx(ms["final_loss"], rel=1e-5)


def test_submitit_pipeline_job_preempted_resumes(reference_runs, tmp_path, monkeypatch):
    """launchers/submit.py's path: PipelineJob on SLURM, preempted with job._interrupt(), requeued by
    submitit after the pipeline's own checkpoint; same masks as the uninterrupted single process."""
    from xpert_dist.launch import cluster, submission

    fault = tmp_path / "fault"
    monkeypatch.setenv("XPERT_FAULT_PAUSE_AT_POLL", "4")  # sbatch exports the environment to the job
    monkeypatch.setenv("XPERT_FAULT_DIR", str(fault))
    settings = cluster.SlurmSettings(partition="debug", timeout_min=10, mem_gb=2, signal_delay_s=60)
    plans = submission.plan_run(str(reference_runs["config"]), [
        f"output_dir={tmp_path / 'run'}"], settings)
    (job,) = submission.submit_plans(plans, "slurm", str(tmp_path / "submitit" / "%j"))
    clock = RunClock(job.job_id)  # time queued behind other jobs does not count
    while not (fault / "paused.rank0").exists():
        assert clock() < 180 and not job.done(), job.paths.stderr
        time.sleep(0.5)
    job._interrupt()  # noqa: SLF001 - preemption: TERM, then submitit's USR2
    (out,) = submission.wait_plans(plans, [job], timeout_s=300)
    assert out.ok, out.error + "\n" + out.log_tail
    ml, mp = manifest(reference_runs["local"]), manifest(tmp_path / "run")
    assert ml["mask_sha256"] and mp["mask_sha256"] == ml["mask_sha256"]
    assert "handing over to submitit for requeue" in Path(job.paths.stderr).read_text()
