"""``python -m xpert_dist.plan``: per-rank memory of a training step and a prune step.

Example (Llama-3.1-70B on 2 nodes x 8 H100-80GB)::

    python -m xpert_dist.plan --model-config llama31_70b --nodes 2 --gpus-per-node 8 --gpu-mem-gb 80 \\
        --host-mem-gb 1024 --zero-stage 3 --method foresight --pbs full --lora-r 8 --seq-len 2048 \\
        --micro-batch 1 --calib-samples 128 --stats-offload cpu
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from .advice import format_table
from .memory import GiB, Constants, PlanSpec, estimate
from .shapes import ModelShape


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m xpert_dist.plan", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-config", required=True,
                    help="HF config.json, or a shipped name: llama2_7b, llama2_70b, llama31_70b")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--host-mem-gb", type=float, default=1024.0, help="GiB of host memory per node")
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--offload-optimizer", default="none", choices=["none", "cpu"])
    ap.add_argument("--offload-params", default="none", choices=["none", "cpu"])
    ap.add_argument("--method", default="foresight", choices=["magnitude", "wanda", "sparsegpt", "foresight"])
    ap.add_argument("--pbs", default="diagonal", choices=["off", "diagonal", "full", "shared"])
    ap.add_argument("--pbs-support", default="dense", choices=["dense", "kept"])
    ap.add_argument("--reconstruct", default="off", choices=["off", "obs"],
                    help="prune.reconstruct (obs: what configs/default_{health,legal}.yaml ship; needs the full XᵀX)")
    ap.add_argument("--saliency", default="diag", choices=["diag", "obs"], help="prune.saliency (obs: full XᵀX)")
    ap.add_argument("--propagate", default="pruned", choices=["pruned", "unpruned", "pruned_first", "true_sequential"],
                    help="prune.propagate (true_sequential: more calibration activations on the host)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=None, help="calibration batch (default: the micro-batch)")
    ap.add_argument("--stats-offload", default="none", choices=["none", "cpu", "disk"])
    ap.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--solver-dtype", default="float32", choices=["float32", "float64"],
                    help="SparseGPT's solver dtype (prune.solver_dtype)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--no-ema", action="store_true", help="no ForeSight EMA state between prune steps")
    ap.add_argument("--hessian-carry", action="store_true",
                    help="prune.hessian_carry > 0: every block's XᵀX (float32) kept between prune steps where "
                         "--stats-offload says (none: accelerator, cpu: host, disk: disk)")
    ap.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"],
                    help="cpu: CPU-only ranks, everything in host memory (what bench/planner_validation.py checks)")
    ap.add_argument("--host-baseline-gb", type=float, default=None,
                    help="override the framework baseline per rank (Constants.host_baseline_bytes_*)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def spec_from_args(args) -> PlanSpec:
    consts = Constants()
    if args.host_baseline_gb is not None:
        consts.host_baseline_bytes_cpu = consts.host_baseline_bytes_gpu = args.host_baseline_gb * GiB
    return PlanSpec(model=ModelShape.load(args.model_config), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                    gpu_mem_gb=args.gpu_mem_gb, host_mem_gb=args.host_mem_gb, zero_stage=args.zero_stage,
                    offload_optimizer=args.offload_optimizer, offload_params=args.offload_params,
                    method=args.method, pbs=args.pbs, pbs_support=args.pbs_support, reconstruct=args.reconstruct,
                    saliency=args.saliency, propagate=args.propagate, lora_r=args.lora_r, lora_dropout=args.lora_dropout, seq_len=args.seq_len, micro_batch=args.micro_batch,
                    calib_samples=args.calib_samples, calib_batch=args.calib_batch,
                    stats_offload=args.stats_offload, stats_dtype=args.stats_dtype,
                    solver_dtype=args.solver_dtype, dtype=args.dtype,
                    grad_checkpointing=args.grad_checkpointing, accelerator=args.accelerator,
                    ema=not args.no_ema, hessian_carry=args.hessian_carry, constants=consts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = estimate(spec_from_args(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_table(plan))
    return 0 if all(all(v.values()) for v in plan.fits.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
