"""Where am I in a distributed job? One answer for torchrun, deepspeed, srun and submitit.

`detect(environ)` is pure: it reads a mapping of environment variables (``os.environ`` by
default) and returns a `DistEnv`. Precedence, first match wins:

1. ``RANK`` and ``WORLD_SIZE`` set: torchrun (``TORCHELASTIC_RUN_ID``), the deepspeed
   launcher (``CROSS_RANK``/``LOCAL_SIZE``) or a caller that exported them (source
   "torchrun", the ``env://`` convention). ``XPERT_DIST_SOURCE`` (written by
   `init_from_environment`) keeps the original source when a process re-detects.
2. ``SUBMITIT_EXECUTOR`` set: a submitit job (slurm or local executor), via
   ``submitit.JobEnvironment()`` when reading the live environment.
3. ``SLURM_PROCID`` together with a step id (``SLURM_STEP_ID``): a task started by
   ``srun``. The batch shell of an ``sbatch`` job (or an ``salloc`` shell) has
   ``SLURM_PROCID=0`` but no step: it is one process, not rank 0 of ``SLURM_NTASKS``.
4. otherwise a single process.

Rendezvous for SLURM/submitit: ``MASTER_ADDR`` = first host of the job's node list
(``scontrol show hostnames``, or the built-in parser when scontrol is missing),
``MASTER_PORT`` = `port_from_job_id` (``slurm/common.sh`` computes the same), unless
``MASTER_ADDR``/``MASTER_PORT`` are already exported, which then win.

`init_from_environment()` exports RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT (what ``torch.distributed`` ``env://`` and
``deepspeed.init_distributed`` read) and installs the stop-signal handlers
(`xpert_dist.launch.signals`).

Network interface for gloo: gloo binds each rank to the address its own hostname resolves to,
which on many machines (Debian's ``127.0.1.1 host``, containers, network namespaces) is a
loopback address that peers on other hosts cannot reach. When the rendezvous address is not a
loopback address and ``GLOO_SOCKET_IFNAME`` is not set, `init_from_environment` sets it to the
interface the kernel routes ``MASTER_ADDR`` through (`interface_towards`), so every rank binds
where the master, and so the other nodes, can reach it. Single-host runs (loopback master) are
left as they are; an exported ``GLOO_SOCKET_IFNAME`` always wins.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Mapping

log = logging.getLogger(__name__)

SOURCES = ("single", "torchrun", "deepspeed", "slurm", "submitit")
DEFAULT_MASTER_PORT = 29500
PORT_BASE = 15000
PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    node_rank: int = 0
    source: str = "single"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"DistEnv.source={self.source!r} is not one of {SOURCES}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistEnv: rank {self.rank} outside world_size {self.world_size}")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise ValueError(f"DistEnv: local_rank {self.local_rank} outside local_world_size "
                             f"{self.local_world_size}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"DistEnv.master_port={self.master_port} is not a TCP port")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_environ(self) -> dict[str, str]:
        """The variables torch.distributed (env://) and deepspeed read."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NODE_RANK": str(self.node_rank),
            "XPERT_DIST_SOURCE": self.source,
        }


# ----------------------------------------------------------------------------- helpers

def port_from_job_id(job_id: str | int) -> int:
    """A rendezvous port derived from a SLURM job id, in [15000, 35000).

    Array tasks have their own SLURM_JOB_ID, so concurrent array elements on one node get
    different ports. ``slurm/common.sh`` uses the same formula.
    """
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ValueError(f"job id {job_id!r} has no digits")
    return PORT_BASE + int(digits) % PORT_SPAN


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list (``gpu[001-003,7],login1``) without scontrol.

    Handles zero-padded ranges, several bracket groups per name (``r[1-2]n[01-02]``) and
    commas inside brackets.
    """
    groups, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            groups.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur:
        groups.append(cur)
    hosts: list[str] = []
    for group in groups:
        hosts.extend(_expand_group(group.strip()))
    return [h for h in hosts if h]


def _expand_group(group: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", group)
    if not m:
        return [group]
    head, tail = group[: m.start()], group[m.end():]
    out = []
    for part in m.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                out.extend(_expand_group(f"{head}{i:0{width}d}{tail}"))
        else:
            out.extend(_expand_group(f"{head}{part}{tail}"))
    return out


def scontrol_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST`` (local parsing, no controller needed); falls back
    to `parse_nodelist` when scontrol is not installed or fails."""
    exe = shutil.which("scontrol")
    if exe:
        try:
            out = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError) as e:  # pragma: no cover - depends on host
            log.warning("scontrol show hostnames %s failed (%s); using the built-in parser", nodelist, e)
    return parse_nodelist(nodelist)


def parse_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` format (``4(x2),3``) -> ``[4, 4, 3]``."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"cannot parse tasks-per-node spec {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is required here but not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


# ----------------------------------------------------------------------------- detection

def _from_env_vars(env: Mapping[str, str]) -> DistEnv:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", 0)
    if env.get("XPERT_DIST_SOURCE") in SOURCES:
        source = env["XPERT_DIST_SOURCE"]
    elif "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        source = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        source = "deepspeed"
    else:
        source = "torchrun"
    # torchrun exports LOCAL_WORLD_SIZE, deepspeed LOCAL_SIZE; hand-exported: assume one node
    local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", 0)) or world
    node_rank = _int(env, "NODE_RANK", _int(env, "GROUP_RANK", _int(env, "CROSS_RANK", 0)))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                   master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                   master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
                   node_rank=node_rank, source=source)


def _slurm_step(env: Mapping[str, str], hostnames: Callable[[str], list[str]], source: str) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    local_rank = _int(env, "SLURM_LOCALID", 0)
    node_rank = _int(env, "SLURM_NODEID", 0)
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        per_node = parse_tasks_per_node(spec)
        local_world = per_node[node_rank] if node_rank < len(per_node) else per_node[-1]
    else:
        nnodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", 1))
        local_world = max(world // max(nnodes, 1), 1)
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = hostnames(nodelist)[0] if nodelist else "127.0.0.1"
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    elif env.get("SLURM_JOB_ID"):
        port = port_from_job_id(env["SLURM_JOB_ID"])
    else:
        port = DEFAULT_MASTER_PORT
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                   master_addr=addr, master_port=port, node_rank=node_rank, source=source)


def _submitit(env: Mapping[str, str], hostnames: Callable[[str], list[str]], live: bool) -> DistEnv:
    executor = env.get("SUBMITIT_EXECUTOR", "")
    if live:
        import submitit  # noqa: PLC0415  (only needed inside submitit jobs)

        je = submitit.JobEnvironment()
        rank, world, local_rank = je.global_rank, je.num_tasks, je.local_rank
        node, nnodes = je.node, je.num_nodes
        job_id = je.raw_job_id
        hosts = list(je.hostnames)
    elif executor == "slurm":
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank, node = _int(env, "SLURM_LOCALID", 0), _int(env, "SLURM_NODEID", 0)
        nnodes = _int(env, "SLURM_JOB_NUM_NODES", 1)
        job_id = env.get("SLURM_JOB_ID", "")
        nodelist = env.get("SLURM_JOB_NODELIST", "")
        hosts = hostnames(nodelist) if nodelist else []
    else:  # local / debug executors
        rank = _int(env, "SUBMITIT_LOCAL_GLOBALID", 0)
        world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
        local_rank = _int(env, "SUBMITIT_LOCAL_LOCALID", 0)
        node, nnodes = _int(env, "SUBMITIT_LOCAL_NODEID", 0), _int(env, "SUBMITIT_LOCAL_JOB_NUM_NODES", 1)
        job_id = env.get("SUBMITIT_LOCAL_JOB_ID", "")
        hosts = []
    if executor != "slurm" and not env.get("MASTER_ADDR"):
        hosts = ["127.0.0.1"]  # local executor: every task on this machine
    addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    elif re.search(r"\d", str(job_id)):
        port = port_from_job_id(job_id)
    else:
        port = DEFAULT_MASTER_PORT
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world,
                   local_world_size=max(world // max(nnodes, 1), 1), master_addr=addr,
                   master_port=port, node_rank=node, source="submitit")


def detect(environ: Mapping[str, str] | None = None,
           hostnames: Callable[[str], list[str]] | None = None) -> DistEnv:
    """Rank/world/rendezvous of this process from environment variables (pure; see module doc).

    ``environ`` defaults to ``os.environ``; pass a dict in tests. ``hostnames`` expands a SLURM
    node list (default: ``scontrol show hostnames`` with a built-in fallback).
    """
    live = environ is None or environ is os.environ
    env = os.environ if environ is None else environ
    expand = hostnames or scontrol_hostnames
    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        return _from_env_vars(env)
    if env.get("SUBMITIT_EXECUTOR"):
        return _submitit(env, expand, live)
    if env.get("SLURM_PROCID") not in (None, ""):
        if env.get("SLURM_STEP_ID") not in (None, "") or env.get("SLURM_STEPID") not in (None, ""):
            return _slurm_step(env, expand, "slurm")
        if _int(env, "SLURM_NTASKS", 1) > 1:
            log.warning("SLURM job with %s tasks but this process was not started by srun "
                        "(no SLURM_STEP_ID): running as a single process; launch with srun",
                        env.get("SLURM_NTASKS"))
    return DistEnv(source="single", master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
                   master_addr=env.get("MASTER_ADDR") or "127.0.0.1")


# ----------------------------------------------------------------------------- network interface

def _interface_with_address(ip: str) -> str | None:
    """The local interface carrying IPv4 address ``ip`` (Linux SIOCGIFADDR), or None."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
        import struct  # noqa: PLC0415

        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def interface_towards(addr: str) -> str | None:
    """Name of the local interface the kernel would send packets for ``addr`` from (IPv4), or None.

    A UDP ``connect`` picks the route without sending anything; the socket's own address then
    names the interface. Reaching one's own address (the master rank on its node) gives the
    interface that carries it, not ``lo``.
    """
    try:
        target = socket.getaddrinfo(addr, 9, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            local = s.getsockname()[0]
    except (OSError, IndexError):
        return None
    return _interface_with_address(local)


def is_loopback(addr: str) -> bool:
    """True when ``addr`` (a name or an IPv4 address) resolves to a loopback address."""
    try:
        ip = socket.getaddrinfo(addr, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError):
        return False
    return ipaddress.ip_address(ip).is_loopback


def choose_gloo_interface(dist_env: DistEnv, environ: Mapping[str, str]) -> str | None:
    """The GLOO_SOCKET_IFNAME to export for ``dist_env``, or None to leave gloo's default.

    None when one is already exported, for a single process, and when the master is a loopback
    address (all ranks on this host).
    """
    if environ.get("GLOO_SOCKET_IFNAME") or not dist_env.is_distributed:
        return None
    if is_loopback(dist_env.master_addr):
        return None
    return interface_towards(dist_env.master_addr)


def init_from_environment(environ: dict | None = None, install_signal_handlers: bool = True,
                          overwrite: bool = True) -> DistEnv:
    """`detect`, then export the torch.distributed/deepspeed variables into ``environ``
    (``os.environ`` by default) and install the stop-signal handlers.

    Exports RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    NODE_RANK and XPERT_DIST_SOURCE, and GLOO_SOCKET_IFNAME (`choose_gloo_interface`).
    With ``overwrite=False`` variables already set are kept.
    Does not initialise the process group itself (the pipeline chooses the backend).
    """
    target = os.environ if environ is None else environ
    dist_env = detect(target)
    for key, value in dist_env.as_environ().items():
        if overwrite or key not in target:
            target[key] = value
    if dist_env.source in ("slurm", "submitit") and dist_env.is_distributed:
        # one CPU thread pool per rank unless the user chose otherwise
        target.setdefault("OMP_NUM_THREADS", target.get("SLURM_CPUS_PER_TASK") or "1")
    ifname = choose_gloo_interface(dist_env, target)
    if ifname:
        target["GLOO_SOCKET_IFNAME"] = ifname
        # logging is not configured yet in the launchers: one plain line per rank on stderr
        print(f"[xpert_dist] rank {dist_env.rank}/{dist_env.world_size} on {socket.gethostname()} "
              f"(node {dist_env.node_rank}): rendezvous {dist_env.master_addr}:{dist_env.master_port}, "
              f"gloo interface {ifname}", file=sys.stderr, flush=True)
    if install_signal_handlers:
        from . import signals  # noqa: PLC0415

        signals.install_handlers()
    log.info("distributed environment: %s", dist_env)
    return dist_env
