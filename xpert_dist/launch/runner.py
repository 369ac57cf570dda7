"""Run one job in this process, whatever started it (python, torchrun, deepspeed, srun, submitit).

Finds rank and world size from the environment, brings up the process group (gloo on CPU, nccl on
GPU) when there is more than one rank or DeepSpeed is used, runs the pipeline, and turns a
preemption into the exit status the SLURM/submitit layer expects.
"""
from __future__ import annotations

import logging
import os
import sys

from ..config import RunConfig

log = logging.getLogger(__name__)


def _skip_shm_op_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op on every CPU init (~35 s) that training never uses."""
    try:
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    except ImportError:  # pragma: no cover
        pass


def init_distributed(cfg: RunConfig, dist_env) -> None:
    import torch

    need = dist_env.world_size > 1 or cfg.ds_config is not None
    if not need:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.ds_config is not None:
        _skip_shm_op_build()
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        import torch.distributed as dist

        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)


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
