"""Cluster (SLURM/submitit) settings, kept apart from the run configuration.

`SlurmSettings` holds what the scheduler needs (partition, nodes, tasks, GPUs, CPUs, memory,
time, log folder). It is read from a small YAML file with a ``slurm:`` section, by default
found next to the run config (``configs/llama70b_health.slurm.yaml``, else
``configs/slurm.yaml``), and then overridden by command-line flags:

    slurm:
      partition: gpu
      nodes: 4
      tasks_per_node: 8      # one process per GPU
      gpus_per_node: 8
      cpus_per_task: 8
      mem: 480G              # or mem_gb: 480
      time: "24:00:00"       # or timeout_min: 1440
      folder: runs/submitit/%j
      setup: ["module load cuda/12.4"]
      additional: {qos: high}

`make_executor` turns settings into a configured ``submitit.AutoExecutor`` for the ``slurm``,
``local`` or ``debug`` executor.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import yaml_load
from ..errors import ConfigError

EXECUTORS = ("slurm", "local", "debug")


@dataclass
class SlurmSettings:
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1        # processes per node (= GPUs per node on GPU clusters)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None    # per node; None: the partition's default
    timeout_min: int = 60
    folder: str = "runs/submitit/%j"
    signal_delay_s: int = 300      # warning signal this long before the time limit
    array_parallelism: int = 16    # max simultaneously running elements of a sweep array
    max_requeues: int = 10         # timeouts tolerated (submitit's max_num_timeout)
    job_name: str = "xpert"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = field(default_factory=list)        # shell lines run before python
    additional: dict = field(default_factory=dict)        # any other sbatch option

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def validate(self) -> "SlurmSettings":
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"slurm.{name}={v!r} must be a positive integer")
        for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"slurm.{name}={v!r} must be a non-negative integer")
        if self.mem_gb is not None and (not isinstance(self.mem_gb, (int, float)) or self.mem_gb <= 0):
            raise ConfigError(f"slurm.mem_gb={self.mem_gb!r} must be a positive number")
        if not isinstance(self.setup, list) or not all(isinstance(s, str) for s in self.setup):
            raise ConfigError("slurm.setup must be a list of shell lines")
        if not isinstance(self.additional, dict):
            raise ConfigError("slurm.additional must be a mapping of sbatch options")
        return self


# ----------------------------------------------------------------------------- parsing

def parse_time_min(value: Any) -> int:
    """``90`` / ``"90"`` minutes, ``"HH:MM:SS"``, ``"MM:SS"``, ``"D-HH[:MM[:SS]]"`` -> minutes (rounded up)."""
    if isinstance(value, bool):
        raise ConfigError(f"slurm.time={value!r} is not a duration")
    if isinstance(value, (int, float)):
        return int(-(-float(value) // 1))
    s = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ConfigError(f"slurm.time={value!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, se = (parts + [0, 0])[:3]
        secs = int(days) * 86400 + h * 3600 + mi * 60 + se
    elif len(parts) == 1:
        secs = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        secs = parts[0] * 60 + parts[1]
    else:
        secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return max(1, -(-secs // 60))


def parse_mem_gb(value: Any) -> float:
    """``480`` (GB), ``"480G"``, ``"512M"``, ``"1T"`` -> GB."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"slurm.mem={value!r}: use e.g. 64G, 512M or a number of GB")
    scale = {"": 1, "K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1, "T": 1024}[m.group(2).upper()]
    return float(m.group(1)) * scale


def settings_from_dict(data: dict | None, source: str = "slurm settings") -> SlurmSettings:
    data = dict(data or {})
    if "slurm" in data and isinstance(data["slurm"], dict):
        rest = sorted(set(data) - {"slurm"})
        if rest:
            raise ConfigError(f"{source}: only a 'slurm:' section is allowed here, found {rest}")
        data = dict(data["slurm"])
    if "time" in data:
        data["timeout_min"] = parse_time_min(data.pop("time"))
    if "mem" in data:
        data["mem_gb"] = parse_mem_gb(data.pop("mem"))
    if "ntasks_per_node" in data:
        data["tasks_per_node"] = data.pop("ntasks_per_node")
    known = {f.name for f in fields(SlurmSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join('slurm.' + k for k in unknown)}; "
                          f"known: {', '.join(sorted(known | {'time', 'mem'}))}")
    return SlurmSettings(**data).validate()


def find_settings_file(config_path: str | Path | None) -> Path | None:
    """``<config stem>.slurm.yaml`` next to the config, else ``slurm.yaml`` in its folder."""
    if not config_path:
        return None
    cfg = Path(config_path)
    for cand in (cfg.with_name(cfg.stem + ".slurm.yaml"), cfg.with_name(cfg.stem + ".slurm.yml"),
                 cfg.with_name("slurm.yaml")):
        if cand.is_file():
            return cand
    return None


def load_settings(path: str | Path | None = None, config_path: str | Path | None = None,
                  overrides: dict | None = None) -> SlurmSettings:
    """Settings from ``path`` (or the file found next to ``config_path``), then ``overrides``
    (None values are ignored, so argparse namespaces can be passed through)."""
    file = Path(path) if path else find_settings_file(config_path)
    data: dict = {}
    if file is not None:
        if not file.is_file():
            raise ConfigError(f"cluster settings file {file} does not exist")
        try:
            data = yaml_load(file.read_text()) or {}  # no YAML 1.1 base-60: time: 1:30:00 stays a duration
        except yaml.YAMLError as e:
            raise ConfigError(f"cluster settings file {file} is not valid YAML: {e}") from e
    settings = settings_from_dict(data, source=str(file) if file else "slurm settings")
    if overrides:
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "time" in clean:
            clean["timeout_min"] = parse_time_min(clean.pop("time"))
        if "mem" in clean:
            clean["mem_gb"] = parse_mem_gb(clean.pop("mem"))
        settings = dataclasses.replace(settings, **clean).validate()
    return settings


# ----------------------------------------------------------------------------- executors

def executor_parameters(settings: SlurmSettings, executor: str) -> dict:
    """``update_parameters`` keywords for a submitit AutoExecutor of kind ``executor``."""
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r} is not one of {EXECUTORS}")
    params: dict[str, Any] = {
        "name": settings.job_name,
        "timeout_min": settings.timeout_min,
        "tasks_per_node": settings.tasks_per_node,
        "cpus_per_task": settings.cpus_per_task,
    }
    if executor == "slurm":
        params["nodes"] = settings.nodes
        if settings.gpus_per_node:
            params["gpus_per_node"] = settings.gpus_per_node
        if settings.mem_gb is not None:
            params["mem_gb"] = settings.mem_gb
        if settings.partition:
            params["slurm_partition"] = settings.partition
        params["slurm_signal_delay_s"] = settings.signal_delay_s
        params["slurm_array_parallelism"] = settings.array_parallelism
        for key in ("account", "qos", "constraint"):
            if getattr(settings, key):
                params[f"slurm_{key}"] = getattr(settings, key)
        if settings.additional:
            params["slurm_additional_parameters"] = dict(settings.additional)
        if settings.setup:
            params["slurm_setup"] = list(settings.setup)
    elif executor == "local":
        if settings.nodes != 1:
            raise ConfigError(f"the local executor runs one node; slurm.nodes={settings.nodes}")
        if settings.setup:
            params["local_setup"] = list(settings.setup)
    return params


def make_executor(settings: SlurmSettings, executor: str = "slurm", folder: str | Path | None = None):
    """A configured ``submitit.AutoExecutor`` (``slurm``: sbatch; ``local``: subprocesses on this
    machine; ``debug``: in this process)."""
    import submitit  # noqa: PLC0415 - optional at import time

    params = executor_parameters(settings, executor)
    kwargs = {}
    if executor == "slurm":
        kwargs["slurm_max_num_timeout"] = settings.max_requeues
    ex = submitit.AutoExecutor(folder=str(folder or settings.folder), cluster=executor, **kwargs)
    ex.update_parameters(**params)
    return ex
