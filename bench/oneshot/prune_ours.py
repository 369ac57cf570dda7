"""One benchmark cell, our implementation: load the model, prune it, save the pruned linear weights.

Run by run.py in its own process (so its peak RSS is this cell's alone):
    python bench/oneshot/prune_ours.py --calib general --pattern unstructured --method wanda --out W.safetensors --meta M.json [--quick]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO))  # xpert_dist from this checkout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True, choices=common.CALIBS)
    ap.add_argument("--pattern", required=True, choices=common.PATTERNS)
    ap.add_argument("--method", required=True, choices=common.OUR_METHODS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from safetensors.torch import save_file
    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import load_model
    from xpert_dist.prune.oneshot import prune

    t_start = time.perf_counter()
    calib = torch.load(common.calib_file(args.quick, args.calib))
    model = load_model(ModelConfig(name_or_path=str(common.model_dir())))
    t0, c0 = time.perf_counter(), time.process_time()
    report = prune(model, args.method, common.SPARSITY, calib, pattern=args.pattern,
                   batch_size=common.BATCH_SIZE, progress=False)
    prune_s, prune_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rss_after_prune_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sd = model.state_dict()
    names = common.pruned_weight_names(model.config.num_hidden_layers)
    save_file({n: sd[n].contiguous() for n in names}, args.out)
    sp = list(report.sparsity.values())
    common.write_json(Path(args.meta), {
        "prune_seconds": prune_s,
        "prune_cpu_seconds": prune_cpu_s,
        "library_step_seconds": report.seconds,
        "process_seconds": time.perf_counter() - t_start,
        "peak_rss_after_prune_mib": rss_after_prune_kib / 1024,
        "reported_sparsity_mean": sum(sp) / len(sp) if sp else None,
        "n_pruned_matrices": len(sp),
        "torch_threads": torch.get_num_threads(),
        "options": {"method": args.method, "sparsity": common.SPARSITY, "pattern": args.pattern,
                    "batch_size": common.BATCH_SIZE, "library_defaults": "PruneConfig (pbs=off)"},
    })


if __name__ == "__main__":
    main()
