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


def parse_layout(spec: str | int, settings: SlurmSettings) -> tuple[str, SlurmSettings]:
    """``"2x1"`` (nodes x tasks per node) or a world size ``"2"`` (laid out by
    :func:`layout_for_world_size`) -> (label, settings for it)."""
    text = str(spec).strip().lower()
    if "x" in text:
        try:
            nodes, tasks = (int(x) for x in text.split("x"))
        except ValueError:
            raise ConfigError(f"layout {spec!r} is not NODESxTASKS (e.g. 2x1) or a world size") from None
        if nodes < 1 or tasks < 1:
            raise ConfigError(f"layout {spec!r}: nodes and tasks per node must be >= 1")
        gpus = tasks if settings.gpus_per_node else 0
        return f"{nodes}x{tasks}", dataclasses.replace(settings, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus)
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"layout {spec!r} is not NODESxTASKS (e.g. 2x1) or a world size") from None
    lay = layout_for_world_size(settings, n)
    return f"{lay.nodes}x{lay.tasks_per_node}", lay


def plan_repro(config_path: str | None, overrides: list[str], layouts: Sequence[str | int],
               settings: SlurmSettings, repeats: int = 1) -> list[JobPlan]:
    """The same config on each layout (label ``<nodes>x<tasks>``, e.g. ``1x1``, ``1x2``, ``2x1``)
    and ``repeats`` reruns of the first (``<layout>-rerun<k>``).

    Nothing is rescaled: ``train.batch_size`` is the global batch, so every layout trains on the
    same rows per optimizer step (a layout that cannot split it is refused here, before submission).
    """
    if not layouts:
        raise ConfigError("repro needs --layouts (e.g. 1x1,1x2,2x1) or --world-sizes (e.g. 1,2)")
    base = _load(config_path, list(overrides))
    root = Path(base["output_dir"]) / "repro"
    runs = [parse_layout(x, settings) for x in layouts]
    labels = [lab for lab, _ in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"repro: layouts repeat ({', '.join(labels)}); use --repeats for reruns")
    runs += [(f"{runs[0][0]}-rerun{k}", runs[0][1]) for k in range(1, repeats + 1)]
    plans = []
    from ..train.data import batch_split  # noqa: PLC0415
    from ..config import config_from_dict  # noqa: PLC0415

    for label, lay in runs:
        ov = list(overrides) + [f"output_dir={root / label}"]
        cfg = _load(config_path, ov)
        batch_split(config_from_dict(cfg).train, lay.nodes * lay.tasks_per_node)  # refuse before submitting
        plans.append(JobPlan(label=label, overrides=ov, config=cfg, settings=lay))
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
