"""Rank/world/rendezvous detection from plain dicts of environment variables."""
from __future__ import annotations

import shutil

import pytest

from xpert_dist.launch import env as E


def test_single_process_by_default():
    d = E.detect({})
    assert (d.rank, d.world_size, d.local_rank, d.source) == (0, 1, 0, "single")
    assert not d.is_distributed and d.is_main


def test_torchrun_variables():
    d = E.detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                  "GROUP_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29555",
                  "TORCHELASTIC_RUN_ID": "none"})
    assert d == E.DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, master_addr="node7",
                          master_port=29555, node_rank=1, source="torchrun")


def test_deepspeed_launcher_variables():
    d = E.detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"})
    assert d.source == "deepspeed" and (d.rank, d.world_size, d.local_world_size) == (1, 2, 2)


def slurm_two_nodes(procid: int, localid: int, nodeid: int, **extra) -> dict:
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
           "SLURM_NODEID": str(nodeid), "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_STEP_NODELIST": "gpu[017-018]"}
    env.update(extra)
    return env


@pytest.mark.parametrize("expand", [E.parse_nodelist, None], ids=["builtin-parser", "scontrol"])
def test_slurm_two_node_step(expand):
    if expand is None and not shutil.which("scontrol"):
        pytest.skip("scontrol not installed")
    d = E.detect(slurm_two_nodes(procid=6, localid=2, nodeid=1), hostnames=expand)
    assert d == E.DistEnv(rank=6, local_rank=2, world_size=8, local_world_size=4, master_addr="gpu017",
                          master_port=E.port_from_job_id(4242), node_rank=1, source="slurm")
    assert d.master_port == 15000 + 4242 % 20000


def test_slurm_exported_rendezvous_wins():
    d = E.detect(slurm_two_nodes(0, 0, 0, MASTER_ADDR="10.0.0.5", MASTER_PORT="31000"),
                 hostnames=E.parse_nodelist)
    assert (d.master_addr, d.master_port, d.source) == ("10.0.0.5", 31000, "slurm")


def test_slurm_batch_shell_is_a_single_process():
    # the sbatch shell has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: it is not rank 0 of N
    env = slurm_two_nodes(0, 0, 0)
    for k in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NODELIST"):
        env.pop(k)
    d = E.detect(env)
    assert (d.world_size, d.source) == (1, "single")


def test_submitit_on_slurm_from_dict():
    env = slurm_two_nodes(5, 1, 1, SUBMITIT_EXECUTOR="slurm")
    d = E.detect(env, hostnames=E.parse_nodelist)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (5, 8, 1, 4, 1)
    assert (d.master_addr, d.master_port, d.source) == ("gpu017", E.port_from_job_id(4242), "submitit")


def test_submitit_local_executor_from_dict():
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "81234", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
    d = E.detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (1, 2, 1, "127.0.0.1", "submitit")
    assert d.master_port == E.port_from_job_id(81234)


def test_submitit_live_environment(monkeypatch):
    """With the live os.environ, detection goes through submitit.JobEnvironment()."""
    for k, v in slurm_two_nodes(3, 3, 0, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_NODELIST="vm").items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    d = E.detect()
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (3, 8, 3, "vm", "submitit")


def test_init_from_environment_exports_and_redetects():
    target = slurm_two_nodes(6, 2, 1)
    d = E.init_from_environment(target, install_signal_handlers=False)
    assert target["RANK"] == "6" and target["WORLD_SIZE"] == "8" and target["LOCAL_RANK"] == "2"
    assert target["MASTER_ADDR"] == "gpu017" and target["MASTER_PORT"] == str(d.master_port)
    assert target["LOCAL_WORLD_SIZE"] == "4"
    # a later detect (e.g. deepspeed.init_distributed reading RANK) agrees and keeps the source
    assert E.detect(target) == d


def test_nodelist_parser_matches_scontrol():
    lists = ["gpu[001-003,007],login1", "r[1-2]n[01-02]", "a01,b[8-10]", "single"]
    assert E.parse_nodelist(lists[0]) == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert E.parse_nodelist(lists[1]) == ["r1n01", "r1n02", "r2n01", "r2n02"]
    if shutil.which("scontrol"):
        for nl in lists:
            assert E.scontrol_hostnames(nl) == E.parse_nodelist(nl), nl


def test_tasks_per_node_and_port():
    assert E.parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert 15000 <= E.port_from_job_id("123_4") < 35000
    with pytest.raises(ValueError):
        E.DistEnv(rank=2, world_size=2)
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        E.detect({"SLURM_PROCID": "x", "SLURM_STEP_ID": "0"})


def _ipv4_addresses() -> dict[str, str]:
    """Interface -> IPv4 address, as `ip -o -4 addr` lists them (the oracle for interface_towards)."""
    import subprocess

    if not shutil.which("ip"):
        pytest.fail("iproute2 (ip) is needed to check the interface choice")
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        found.setdefault(parts[1].split("@")[0], parts[3].split("/")[0])
    return found


def test_interface_towards_an_address_is_the_interface_carrying_it():
    addrs = _ipv4_addresses()
    assert addrs.get("lo") == "127.0.0.1"
    for ifname, ip in addrs.items():
        assert E.interface_towards(ip) == ifname, (ifname, ip)
    assert E.interface_towards("no-such-host.invalid") is None


def test_gloo_interface_only_for_a_multi_host_rendezvous(monkeypatch):
    addrs = {k: v for k, v in _ipv4_addresses().items() if k != "lo"}
    if not addrs:
        pytest.fail("this machine has no non-loopback IPv4 interface to check against")
    ifname, ip = sorted(addrs.items())[0]
    multi = E.DistEnv(rank=1, world_size=2, master_addr=ip, master_port=15001, source="slurm")
    assert E.choose_gloo_interface(multi, {}) == ifname
    assert E.choose_gloo_interface(multi, {"GLOO_SOCKET_IFNAME": "eth7"}) is None   # the user's choice wins
    local = E.DistEnv(rank=1, world_size=2, master_addr="127.0.0.1", master_port=15001, source="slurm")
    assert E.choose_gloo_interface(local, {}) is None                               # one host: gloo's default
    assert E.choose_gloo_interface(E.DistEnv(master_addr=ip), {}) is None           # one process
    target = {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "1",
              "SLURM_JOB_ID": "1", "MASTER_ADDR": ip, "MASTER_PORT": "15001"}
    E.init_from_environment(target, install_signal_handlers=False)
    assert target["GLOO_SOCKET_IFNAME"] == ifname
