"""submitit on the real local SLURM cluster: a tiny job, preemption + requeue, failure reports."""
from __future__ import annotations

import io
import time
from pathlib import Path

import cloudpickle

from xpert_dist.launch import cluster, jobs

from . import jobfuncs as helpers
from .conftest import RunClock

# the job processes unpickle these without needing this test package on their sys.path
cloudpickle.register_pickle_by_value(helpers)


def executor(folder, **changes):
    settings = cluster.SlurmSettings(partition="debug", timeout_min=5, mem_gb=1, signal_delay_s=60, **changes)
    return cluster.make_executor(settings, "slurm", folder)


def test_tiny_two_task_job_sees_its_ranks(slurm_cluster, submitit_folder):
    job = executor(submitit_folder, tasks_per_node=2).submit(helpers.report_env)
    out = jobs.wait_and_report([job], ["env"], all_tasks=True, timeout_s=120)[0]
    assert out.ok, out.error + "\n" + out.log_tail
    res = sorted(out.result, key=lambda r: r["rank"])
    assert [r["rank"] for r in res] == [0, 1] and {r["world_size"] for r in res} == {2}
    assert {r["source"] for r in res} == {"submitit"} and {r["local_rank"] for r in res} == {0, 1}
    assert len({(r["master_addr"], r["master_port"]) for r in res}) == 1  # one rendezvous
    assert jobs.collect(job).result["rank"] == 0  # a multi-task job's result is rank 0's


def test_checkpointable_job_preempted_resumes(slurm_cluster, submitit_folder, tmp_path):
    state = tmp_path / "counter"
    state.mkdir()
    job = executor(submitit_folder).submit(helpers.CounterJob(8, str(state), step_s=0.5))
    progress = state / "progress"
    clock = RunClock(job.job_id)  # time queued behind other jobs does not count
    while not (progress.exists() and int(progress.read_text() or 0) >= 3):
        assert clock() < 90, "job did not start counting"
        assert not job.done(), jobs.failure_reason(job)
        time.sleep(0.3)
    job._interrupt()  # noqa: SLF001 - submitit's documented way to simulate preemption (TERM, then USR2)
    out = jobs.wait_and_report([job], ["counter"], timeout_s=150)[0]
    assert out.ok, out.error + "\n" + out.log_tail
    res = out.result
    assert res["i"] == 8
    assert len(res["starts"]) == 2, res
    first, second = res["starts"]
    assert first["i"] == 0 and second["i"] >= 3 and second["restart"] == "1"
    assert second["job"] == first["job"]  # requeued, same job id
    log = Path(job.paths.stderr).read_text(errors="replace")
    assert "handing over to submitit for requeue" in log


def test_failures_are_reported_from_the_log_quickly(slurm_cluster, submitit_folder):
    ex = executor(submitit_folder)
    raised = ex.submit(helpers.fail_with_exception, "reason-raised-7f3")
    died = ex.submit(helpers.die_without_result, "reason-died-19c")
    stream = io.StringIO()
    t0 = time.monotonic()
    outs = jobs.wait_and_report([raised, died], ["raises", "dies"], timeout_s=90, stream=stream)
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"failures took {elapsed:.0f} s to be reported"
    text = stream.getvalue()
    assert not outs[0].ok and "reason-raised-7f3" in outs[0].error
    assert not outs[1].ok and "FAILED" in outs[1].state and "UncompletedJobError" in outs[1].error
    assert "reason-died-19c" in outs[1].log_tail            # the reason comes from the job's stderr
    assert "reason-raised-7f3" in text and "reason-died-19c" in text and "FAILED" in text
