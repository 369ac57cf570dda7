"""Planning and submitting pipeline jobs with submitit (used by ``launchers/submit.py``).

A `JobPlan` is one run: a label, the ``key=value`` overrides that make it, its output_dir and
the cluster layout. `plan_run`, `plan_sweep` (cartesian product of ``--grid`` values, one job
array) and `plan_repro` (the same config at several world sizes plus repeats) build plans;
the config of every plan is loaded and validated here, before anything is submitted, so a bad
override fails on the login node and not in the queue.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from ..config import load_config
from ..errors import ConfigError
from .cluster import SlurmSettings, make_executor
from .jobs import Outcome, PipelineJob, wait_and_report


@dataclass
class JobPlan:
    label: str
    overrides: list[str]
    config: dict                  # the validated RunConfig as a dict
    settings: SlurmSettings

    @property
    def output_dir(self) -> str:
        return self.config["output_dir"]

    @property
    def world_size(self) -> int:
        return self.settings.world_size


# ----------------------------------------------------------------------------- grids

def split_values(raw: str) -> list[str]:
    """``"0.3,0.5,[q_proj,v_proj]"`` -> ``["0.3", "0.5", "[q_proj,v_proj]"]`` (commas inside brackets kept)."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch in "[{"
        depth -= ch in "]}"
        cur += ch
    out.append(cur)
    values = [v.strip() for v in out]
    if any(v == "" for v in values):
        raise ConfigError(f"grid values {raw!r}: empty value")
    return values


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["prune.sparsity=0.3,0.5", "train.seed=0,1"]`` -> ``[(key, values), ...]`` (order kept)."""
    grid = []
    seen = set()
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--grid {spec!r} is not of the form key=v1,v2,...")
        key, raw = spec.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(f"--grid key {key} given twice")
        seen.add(key)
        grid.append((key, split_values(raw)))
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def grid_label(assignment: Sequence[tuple[str, str]]) -> str:
    """``[("prune.sparsity", "0.5"), ("train.seed", "1")]`` -> ``"prune.sparsity-0.5_train.seed-1"``."""
    return "_".join(f"{_slug(k)}-{_slug(v)}" for k, v in assignment)


def expand_grid(grid: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    keys = [k for k, _ in grid]
    return [list(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in grid))]


# ----------------------------------------------------------------------------- plans

def _load(config_path: str | None, overrides: list[str]) -> dict:
    cfg = load_config(config_path, overrides)
    data = cfg.to_dict()
    data["output_dir"] = str(Path(data["output_dir"]).resolve())
    return data


def plan_run(config_path: str | None, overrides: list[str], settings: SlurmSettings,
             label: str = "run") -> list[JobPlan]:
    data = _load(config_path, list(overrides))
    return [JobPlan(label=label, overrides=list(overrides), config=data, settings=settings)]


def plan_sweep(config_path: str | None, overrides: list[str], grid_specs: Sequence[str],
               settings: SlurmSettings) -> list[JobPlan]:
    """One plan per grid point; output_dir = ``<output_dir>/<label>`` unless the grid sets output_dir."""
    grid = parse_grid(grid_specs)
    if not grid:
        raise ConfigError("sweep needs at least one --grid key=v1,v2")
    base = _load(config_path, list(overrides))
    plans = []
    for assignment in expand_grid(grid):
        label = grid_label(assignment)
        extra = [f"{k}={v}" for k, v in assignment]
        keys = {k for k, _ in assignment}
        if "output_dir" not in keys:
            extra.append(f"output_dir={Path(base['output_dir']) / label}")
        if "name" not in keys:
            extra.append(f"name={base['name']}-{label}")
        ov = list(overrides) + extra
        plans.append(JobPlan(label=label, overrides=ov, config=_load(config_path, ov), settings=settings))
    dirs = [p.output_dir for p in plans]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("sweep: several grid points share an output_dir; add output_dir to the grid "
                          "or make the values distinct")
    return plans


def layout_for_world_size(settings: SlurmSettings, world_size: int) -> SlurmSettings:
    """Nodes/tasks for ``world_size`` ranks: one node while it fits ``settings.tasks_per_node``
    (the per-node maximum, e.g. GPUs per node), else whole nodes of that many tasks."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    cap = settings.tasks_per_node
    if world_size <= cap:
        gpus = world_size if settings.gpus_per_node else 0
        return dataclasses.replace(settings, nodes=1, tasks_per_node=world_size, gpus_per_node=gpus)
    if world_size % cap:
        raise ConfigError(f"world size {world_size} is not a multiple of tasks_per_node={cap}")
    return dataclasses.replace(settings, nodes=world_size // cap, tasks_per_node=cap)


def per_rank_batch(batch_size: int, grad_accum: int, base_world: int, world: int) -> list[str]:
    """Overrides that keep the global batch (``batch_size x grad_accum x world``, with
    ``batch_size`` per rank) of ``base_world`` ranks at ``world`` ranks: the batch per rank is
    divided first, then the accumulation; ConfigError when neither divides."""
    total = batch_size * grad_accum * base_world
    if total % world:
        raise ConfigError(f"global batch {total} (train.batch_size={batch_size} x grad_accum={grad_accum} x "
                          f"{base_world} ranks) cannot be split over {world} ranks")
    per_rank = total // world
    if per_rank % grad_accum == 0:
        return [f"train.batch_size={per_rank // grad_accum}", f"train.grad_accum={grad_accum}"]
    if per_rank % batch_size == 0:
        return [f"train.batch_size={batch_size}", f"train.grad_accum={per_rank // batch_size}"]
    return [f"train.batch_size={per_rank}", "train.grad_accum=1"]


def plan_repro(config_path: str | None, overrides: list[str], world_sizes: Sequence[int],
               settings: SlurmSettings, repeats: int = 1, keep_global_batch: bool = True) -> list[JobPlan]:
    """The same config at each world size (``ws<N>``) and ``repeats`` reruns of the first (``ws<N>-repeat<k>``).

    ``train.batch_size`` is per rank, so with ``keep_global_batch`` the per-rank batch (or the
    accumulation) is rescaled so every run sees the same global batches as the first world size
    (the config's values apply to that one): only then can the masks agree.
    """
    if not world_sizes:
        raise ConfigError("repro needs --world-sizes, e.g. 1,2")
    base = _load(config_path, list(overrides))
    root = Path(base["output_dir"]) / "repro"
    runs = [(f"ws{n}", n) for n in world_sizes]
    runs += [(f"ws{world_sizes[0]}-repeat{k}", world_sizes[0]) for k in range(1, repeats + 1)]
    plans = []
    for label, n in runs:
        ov = list(overrides)
        if keep_global_batch:
            ov += per_rank_batch(base["train"]["batch_size"], base["train"]["grad_accum"], world_sizes[0], n)
        ov.append(f"output_dir={root / label}")
        plans.append(JobPlan(label=label, overrides=ov, config=_load(config_path, ov),
                             settings=layout_for_world_size(settings, n)))
    return plans


# ----------------------------------------------------------------------------- submission

def describe(plan: JobPlan) -> str:
    s = plan.settings
    return (f"{plan.label}: {s.nodes} node(s) x {s.tasks_per_node} task(s)"
            f"{f' x {s.gpus_per_node} GPU(s)/node' if s.gpus_per_node else ''}, "
            f"{s.timeout_min} min -> {plan.output_dir}  [{' '.join(plan.overrides)}]")


def submit_plans(plans: Sequence[JobPlan], executor: str = "slurm", folder: str | None = None,
                 as_array: bool = False, stream: TextIO | None = None) -> list:
    """Submit one `PipelineJob` per plan; plans with the same layout go out as one array when
    ``as_array``. Returns the submitit jobs in plan order."""
    stream = stream or sys.stdout
    jobs: list = [None] * len(plans)
    if as_array:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(plans):
            key = json.dumps(dataclasses.asdict(p.settings), sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            ex = make_executor(plans[idx[0]].settings, executor, folder)
            with ex.batch():
                submitted = [ex.submit(PipelineJob(plans[i].config, plans[i].label)) for i in idx]
            for i, job in zip(idx, submitted):
                jobs[i] = job
    else:
        for i, p in enumerate(plans):
            ex = make_executor(p.settings, executor, folder)
            jobs[i] = ex.submit(PipelineJob(p.config, p.label))
    for p, job in zip(plans, jobs):
        print(f"submitted job {job.job_id} ({p.label}) -> {p.output_dir}\n"
              f"    logs: {job.paths.stdout} / {job.paths.stderr}", file=stream, flush=True)
    return jobs


def wait_plans(plans: Sequence[JobPlan], jobs: Sequence, timeout_s: float | None = None,
               stream: TextIO | None = None) -> list[Outcome]:
    return wait_and_report(jobs, [p.label for p in plans], timeout_s=timeout_s, stream=stream)
