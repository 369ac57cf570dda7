"""Time one in-loop prune step of the shipped health config on SmolLM2-135M, and where its time goes.

Side by side in one run, for each ``prune.calib_dtype`` (``auto``: float32 calibration forwards;
``bfloat16``: under autocast): the first prune step (no mask yet: with ``pruned_first`` every block runs
twice) and the second (one forward per block), at the method table's budget (32 calibration windows of
256 tokens from the health training data, 40%). Then one more second step under cProfile, split into
block forwards, ``XᵀX`` accumulation, the pruning maths (scores, masks, OBS reconstruction) and the
rest. Quality beside it: agreement of the two settings' masks, and the perplexity of each pruned model
(no training) on held-out ``health_valid`` windows.

    python bench/prune_step.py [--threads 1] [--windows 32]

Writes ``bench/results/prune_step.{json,md}``.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import math
import os
import pstats
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from xpert_dist.config import load_config  # noqa: E402
from xpert_dist.models import loading  # noqa: E402
from xpert_dist.models.lora import wrap_lora  # noqa: E402
from xpert_dist.prune.pruner import Pruner  # noqa: E402
from xpert_dist.train.data import build_train_data, calibration_batch  # noqa: E402
from xpert_dist.utils.atomic import atomic_write_text  # noqa: E402

OUT = os.path.join(ROOT, "bench", "results")


def _cum(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(v[3] for (f, _l, fn), v in stats.stats.items() if f.endswith(suffix) and fn == name)


def profile_step(pruner, model, ids, sparsity) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    pruner.step(model, ids, sparsity)
    prof.disable()
    s = pstats.Stats(prof)
    total = sum(v[2] for v in s.stats.values())  # total internal time = the profiled wall, roughly
    blocks = _cum(s, "stats/sequential.py", "_run_block")
    stats = _cum(s, "stats/capture.py", "accumulate")  # inside the block forwards (hooks)
    maths = _cum(s, "prune/pruner.py", "prune_block")
    return {"profiled_s": total, "block_forwards_s": blocks - stats, "xtx_s": stats, "pruning_maths_s": maths,
            "other_s": total - blocks - maths}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    nll, n = 0.0, 0
    for s in range(0, ids.shape[0], batch):
        x = ids[s:s + batch]
        out = model(input_ids=x, labels=x)
        nll += float(out.loss) * x.numel()
        n += x.numel()
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=32, help="calibration windows per prune step")
    ap.add_argument("--valid-windows", type=int, default=16)
    args = ap.parse_args()
    if args.threads < 1 or args.windows < 1:
        ap.error("--threads and --windows must be >= 1")
    torch.set_num_threads(args.threads)
    overrides = [f"data.calib_samples={args.windows}", "prune.propagate=pruned_first", "eval.tasks=[]"]
    cfg = load_config(os.path.join(ROOT, "configs", "default_health.yaml"), overrides)
    tok = loading.load_tokenizer(cfg.model)
    calib = build_train_data(cfg, tok, None).calib_ids
    valid_cfg = load_config(os.path.join(ROOT, "configs", "default_health.yaml"),
                            [*overrides, "data.train=health_valid", f"data.calib_samples={args.valid_windows}",
                             "data.seed=1"])
    valid = build_train_data(valid_cfg, tok, None).calib_ids
    sparsity = cfg.prune.sparsity
    rows, masks = {}, {}
    for dtype in ("auto", "bfloat16"):
        with tempfile.TemporaryDirectory() as work:
            model = wrap_lora(loading.load_model(cfg.model, seed=0), cfg.lora).eval()
            pruner = Pruner(dataclasses.replace(cfg.prune, calib_dtype=dtype), batch_size=calibration_batch(cfg.train),
                            progress=False, work_dir=work)
            t = time.perf_counter()
            pruner.step(model, calib, sparsity)
            first = time.perf_counter() - t
            t = time.perf_counter()
            pruner.step(model, calib, sparsity)
            second = time.perf_counter() - t
            prof = profile_step(pruner, model, calib, sparsity)
            masks[dtype] = {k: v.clone() for k, v in pruner.masks.items()}
            rows[dtype] = {"first_step_s": first, "second_step_s": second, **prof,
                           "valid_ppl_pruned": perplexity(model, valid)}
            print(f"[prune_step] calib_dtype={dtype}: {rows[dtype]}", flush=True)
    agree = {k: float((masks["auto"][k] == masks["bfloat16"][k]).float().mean()) for k in masks["auto"]}
    res = {"args": vars(args), "overrides": overrides, "sparsity": sparsity, "calib_shape": list(calib.shape),
           "valid_shape": list(valid.shape), "rows": rows,
           "mask_agreement_min": min(agree.values()), "mask_agreement_mean": sum(agree.values()) / len(agree)}
    a, b = rows["auto"], rows["bfloat16"]
    md = [f"One SmolLM2-135M prune step (configs/default_health.yaml, {sparsity:.0%}, ForeSight + OBS "
          f"reconstruction, `pruned_first`), {calib.shape[0]} calibration windows of {calib.shape[1]} tokens, "
          f"{args.threads} thread(s); no training between the steps.", "",
          "| | float32 (`auto`) | bf16 autocast | bf16 / float32 |", "|---|---|---|---|"]
    for key, label in (("first_step_s", "first prune step s (two forwards per block)"),
                       ("second_step_s", "second prune step s (one forward per block)"),
                       ("block_forwards_s", "profiled second step: block forwards s"),
                       ("xtx_s", "… XᵀX accumulation s"), ("pruning_maths_s", "… scores, masks, OBS s"),
                       ("other_s", "… the rest s")):
        md.append(f"| {label} | {a[key]:.1f} | {b[key]:.1f} | {b[key] / a[key]:.2f}× |")
    md.append(f"| perplexity of the pruned model, {valid.shape[0]} health_valid windows (no training) | "
              f"{a['valid_ppl_pruned']:.3f} | {b['valid_ppl_pruned']:.3f} | "
              f"{b['valid_ppl_pruned'] / a['valid_ppl_pruned']:.4f}× |")
    md += ["", f"Mask agreement between the two (share of entries, over the {len(agree)} matrices): min "
               f"{res['mask_agreement_min']:.5f}, mean {res['mask_agreement_mean']:.5f}.", ""]
    os.makedirs(OUT, exist_ok=True)
    for name, text in (("prune_step.json", json.dumps(res, indent=2)), ("prune_step.md", "\n".join(md))):
        atomic_write_text(os.path.join(OUT, name), text)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
