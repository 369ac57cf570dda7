"""Run one job in this process, whatever started it (python, torchrun, deepspeed, srun, submitit).

Finds rank and world size from the environment, brings up the process group (gloo on CPU, nccl on
GPU) when there is more than one rank or DeepSpeed is used, runs the pipeline, and turns a
preemption into the exit status the SLURM/submitit layer expects.
"""
from __future__ import annotations

import logging
import os

from ..config import RunConfig

log = logging.getLogger(__name__)


def init_distributed(cfg: RunConfig, dist_env) -> None:
    """Process group for multi-rank or DeepSpeed runs (gloo on CPU, nccl on GPU); no-op otherwise."""
    import torch

    if dist_env.world_size == 1 and cfg.ds_config is None:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..distributed.comm import init_distributed as init_pg

    init_pg(use_deepspeed=cfg.ds_config is not None)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)


def run_job(cfg: RunConfig, progress: bool = True) -> dict:
    """Run ``cfg`` in this process; returns the pipeline's results."""
    from . import env

    dist_env = env.init_from_environment()
    setup_logging(dist_env.rank)
    init_distributed(cfg, dist_env)
    from ..train.pipeline import run

    try:
        return run(cfg, progress=progress)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
