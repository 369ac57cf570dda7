"""The sbatch scripts: syntax, and what their DRY_RUN says each rank would run."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from xpert_dist.launch import env as E

from .conftest import REPO

SCRIPTS = ["prune_70b.sh", "prune_7b.sh", "cpu_tiny.sh", "common.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)


def sbatch_opts(name: str) -> dict:
    opts = {}
    for line in (REPO / "slurm" / name).read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2)
    return opts


def dry_run(script: str, nodelist: str, job_id: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD"))}
    env.update(DRY_RUN="1", SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID=job_id, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "slurm" / script), *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_70b_dry_run_carries_the_allocation():
    opts = sbatch_opts("prune_70b.sh")
    nodes, tpn, gpn = int(opts["nodes"]), int(opts["ntasks-per-node"]), int(opts["gpus-per-node"])
    assert tpn == gpn and nodes >= 2
    for key in ("requeue", "signal", "time", "mem", "cpus-per-task", "output", "partition"):
        assert key in opts, key
    assert opts["signal"] == "USR1@300"
    nodelist, job_id = f"gpu[101-{100 + nodes}]", "987654"
    out = dry_run("prune_70b.sh", nodelist, job_id, "prune.sparsity=0.5")
    hosts = E.parse_nodelist(nodelist)
    port = E.port_from_job_id(job_id)
    world = nodes * tpn
    assert f"{nodes} node(s) x {tpn} task(s) = {world} rank(s), {gpn} GPU(s)/node" in out
    assert f"MASTER_ADDR={hosts[0]} MASTER_PORT={port}" in out
    assert f"srun --nodes={nodes} --ntasks-per-node={tpn}" in out
    rank_lines = [ln for ln in out.splitlines() if ln.strip().startswith("rank ")]
    assert len(rank_lines) == world
    for n, host in enumerate(hosts):
        block = out.split(f"node {host} (node_rank {n}):")[1].split("node ")[0]
        assert block.count("  rank ") == tpn
    for line in rank_lines:
        assert "launchers/run.py --config configs/llama70b_health.yaml ds_config=ds_configs/zero3_offload.json " \
               "prune.sparsity=0.5" in line
        assert f"WORLD_SIZE={world}" in line and f"MASTER_ADDR={hosts[0]}" in line
        # what srun gives this rank is what env.py turns into the same rank/rendezvous
        kv = dict(re.findall(r"(SLURM_\w+)=(\S+)", line))
        d = E.detect({**kv, "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": nodelist,
                      "SLURM_STEP_TASKS_PER_NODE": f"{tpn}(x{nodes})"}, hostnames=E.parse_nodelist)
        assert f"RANK={d.rank} LOCAL_RANK={d.local_rank} WORLD_SIZE={d.world_size}" in line
        assert (d.master_addr, d.master_port, d.local_world_size) == (hosts[0], port, tpn)


def test_7b_and_cpu_tiny_dry_runs():
    out = dry_run("prune_7b.sh", "gpu[001-002]", "55")
    assert "configs/llama7b_health.yaml" in out and "ds_config=ds_configs/zero3.json" in out
    assert "2 node(s) x 4 task(s) = 8 rank(s), 4 GPU(s)/node" in out
    out = dry_run("cpu_tiny.sh", "vm", "7", "/tmp/tiny.json", "train.max_steps=2")
    assert "1 node(s) x 2 task(s) = 2 rank(s), 0 GPU(s)/node, 1 CPU(s)/task" in out
    assert "--config /tmp/tiny.json train.max_steps=2" in out and "ds_config" not in out
    assert "MASTER_ADDR=vm MASTER_PORT=15007" in out
