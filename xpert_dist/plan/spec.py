"""The memory planner's inputs and outputs: constants, the run's shape and settings, terms and the plan.

Kept apart so that :mod:`.memory` (the arithmetic) and :mod:`.advice` (presentation) both import
from here and not from each other.
"""
from __future__ import annotations

import math  # noqa: F401
from dataclasses import asdict, dataclass, field  # noqa: F401

from ..errors import ConfigError  # noqa: F401
from .shapes import GiB, LINEARS, ModelShape  # noqa: F401

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("magnitude", "wanda", "sparsegpt", "foresight")
PBS = ("off", "diagonal", "full", "shared")


@dataclass
class Constants:
    """Constants that are not formulas of the model (named, documented, overridable).

    host_baseline_bytes_cpu: resident memory of one rank on the CPU-only machine after importing
        torch 2.13, transformers 5.24, peft 0.21, deepspeed 0.19.8 and initialising the gloo process
        group, before any model exists. Calibrated by ``bench/planner_validation.py`` (median of the
        measured per-rank baselines, see bench/results/planner_validation.json).
    host_baseline_bytes_gpu: the same for a CUDA rank (CUDA/cuBLAS/NCCL libraries mapped, pinned
        staging buffers). Assumed (not measurable here): 4 GiB.
    accel_baseline_bytes: CUDA context + NCCL communicators + cuBLAS workspace per GPU. Assumed
        (typical for H100/H200 with torch 2.x): 1.5 GiB.
    allocator_slack: multiplicative slack of the CUDA caching allocator (fragmentation) applied to
        accelerator terms. Assumed: 1.10. On CPU, glibc's arenas play the same role; the CPU
        validation calibrates ``cpu_allocator_slack``.
    cpu_allocator_slack: the same for host terms in the CPU case. 1.0 = glibc with a fixed mmap
        threshold (``MALLOC_MMAP_THRESHOLD_=131072``: freed tensors go back to the OS); glibc's
        default dynamic threshold retains freed heap, measured as a separate row in
        bench/results/planner_validation.md.
    headroom: fraction of the device memory the plan may use before it says "does not fit".
    """

    host_baseline_bytes_cpu: float = 413 * 1024 ** 2  # calibrated: median of 6 ranks, 2026-11-28
    host_baseline_bytes_gpu: float = 4.0 * GiB
    accel_baseline_bytes: float = 1.5 * GiB
    allocator_slack: float = 1.10
    cpu_allocator_slack: float = 1.0
    headroom: float = 0.92


@dataclass
class PlanSpec:
    model: ModelShape
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    host_mem_gb: float = 1024.0
    zero_stage: int = 3
    offload_optimizer: str = "none"  # none | cpu
    offload_params: str = "none"  # none | cpu
    method: str = "foresight"
    pbs: str = "diagonal"
    pbs_support: str = "dense"
    reconstruct: str = "off"  # off | obs (prune.reconstruct: OBS update of the kept weights, full XᵀX)
    saliency: str = "diag"  # diag | obs (prune.saliency: obs needs the full XᵀX and its inverse's diagonal)
    # prune.propagate: true_sequential keeps, beside a block's inputs and outputs, o_proj's output and down_proj's
    # input per calibration row on the host (stats/sequential._staged_block); the others keep inputs and outputs
    propagate: str = "pruned"
    lora_r: int = 8
    lora_targets: tuple = LINEARS
    lora_dropout: float = 0.05
    seq_len: int = 2048
    micro_batch: int = 1
    calib_samples: int = 128
    calib_batch: int | None = None  # None: the micro-batch (the pipeline calibrates with train.micro_batch_size)
    stats_offload: str = "none"  # none | cpu | disk
    stats_dtype: str = "float32"
    solver_dtype: str = "float32"  # SparseGPT's (prune.solver_dtype)
    dtype: str = "bfloat16"
    grad_checkpointing: bool = False
    accelerator: str = "gpu"  # gpu | cpu (everything in host memory: the CPU-only case)
    ema: bool = True  # ForeSight EMA across prune steps (kept on the module owner)
    hessian_carry: bool = False  # prune.hessian_carry > 0: every block's full XᵀX kept between prune steps (owner)
    prefetch_bucket_params: int = 50_000_000  # stage3_prefetch_bucket_size
    constants: Constants = field(default_factory=Constants)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--nodes {self.nodes} and --gpus-per-node {self.gpus_per_node} must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage {self.zero_stage} must be 0, 1, 2 or 3")
        for name, value, allowed in (("--offload-optimizer", self.offload_optimizer, ("none", "cpu")),
                                     ("--offload-params", self.offload_params, ("none", "cpu")),
                                     ("--method", self.method, METHODS), ("--pbs", self.pbs, PBS),
                                     ("--pbs-support", self.pbs_support, ("dense", "kept")),
                                     ("--reconstruct", self.reconstruct, ("off", "obs")),
                                     ("--saliency", self.saliency, ("diag", "obs")),
                                     ("--propagate", self.propagate, ("pruned", "unpruned", "pruned_first",
                                                                      "true_sequential")),
                                     ("--stats-offload", self.stats_offload, ("none", "cpu", "disk")),
                                     ("--stats-dtype", self.stats_dtype, ("float32", "float64")),
                                     ("--solver-dtype", self.solver_dtype, ("float32", "float64")),
                                     ("--dtype", self.dtype, tuple(DTYPE_BYTES)),
                                     ("--accelerator", self.accelerator, ("gpu", "cpu"))):
            if value not in allowed:
                raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.reconstruct != "off" and (self.method == "sparsegpt" or self.pbs != "off"):
            raise ConfigError(f"--reconstruct {self.reconstruct} compensates a second time with --method {self.method} "
                              f"/ --pbs {self.pbs} (as prune.reconstruct does): use --pbs off and a score method")
        if self.offload_params == "cpu" and self.zero_stage != 3:
            raise ConfigError("--offload-params cpu needs --zero-stage 3")
        if self.offload_optimizer == "cpu" and self.zero_stage == 0:
            raise ConfigError("--offload-optimizer cpu needs --zero-stage >= 1")
        for name in ("lora_r", "seq_len", "micro_batch", "calib_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


@dataclass
class Term:
    step: str  # "train" | "prune"
    phase: str  # "resident" | "compute" (train) ; "resident" | "capture" | "accumulate" | "reduce" | "solve" (prune)
    where: str  # "accel" | "host" | "disk"
    name: str
    bytes: float
    formula: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    spec: PlanSpec
    terms: list[Term]
    peaks: dict  # {step: {"accel": bytes, "host": bytes, "host_node": bytes, "disk": bytes}}
    fits: dict  # {step: {"accel": bool, "host": bool}}
    suggestions: list[str]

    def to_dict(self) -> dict:
        s = self.spec
        m = s.model
        return {"model": asdict(m), "params": m.total_params(), "lora_params": m.lora_params(s.lora_r, s.lora_targets),
                "world_size": s.world,
                "spec": {k: v for k, v in asdict(s).items() if k not in ("model", "constants")},
                "constants": asdict(s.constants), "terms": [t.to_dict() for t in self.terms],
                "peaks_bytes": self.peaks, "fits": self.fits, "suggestions": self.suggestions}
