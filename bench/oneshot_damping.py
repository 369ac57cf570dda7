"""How much the OBS reconstruction fits its 32 calibration windows: one-shot 50% on the base model, by damping.

SmolLM2-135M (the method table's fp32 copy), no training, one prune step of the shipped health config at 50%
(ForeSight + OBS reconstruction, ``pruned_first``) or SparseGPT, with the damping ``λ = percdamp · mean diag XᵀX``
of ``prune.sparsegpt_percdamp`` (SparseGPT's 0.01 is the shipped value) and with 64 windows instead of 32.
Perplexity of each pruned model on 32 ``health_valid`` windows (held out of the training data) and on the
first 16 calibration windows (what the reconstruction was fitted to). A gap that shrinks with more damping or
more windows is the reconstruction fitting its calibration set rather than the domain.

    python bench/oneshot_damping.py [--only NAME,...]

Each variant is cached in ``bench/results/cache/oneshot_damping.json`` (resumable: a finished variant is not
rerun); writes ``bench/results/oneshot_damping.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "bench", "method_table"))

from prune_step import perplexity  # noqa: E402

from xpert_dist.config import load_config  # noqa: E402
from xpert_dist.models import loading  # noqa: E402
from xpert_dist.models.lora import wrap_lora  # noqa: E402
from xpert_dist.prune.pruner import Pruner  # noqa: E402
from xpert_dist.train.data import build_train_data, calibration_batch  # noqa: E402
from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text  # noqa: E402

OUT = os.path.join(ROOT, "bench", "results")
CACHE = os.path.join(OUT, "cache", "oneshot_damping.json")
SPARSEGPT = ["prune.method=sparsegpt", "prune.reconstruct=off"]
VARIANTS = {  # name -> (label, overrides)
    "foresight_obs_d0.01": ("ForeSight + OBS, damping 0.01 (shipped)", []),
    "foresight_obs_d0.03": ("ForeSight + OBS, damping 0.03", ["prune.sparsegpt_percdamp=0.03"]),
    "foresight_obs_d0.1": ("ForeSight + OBS, damping 0.1", ["prune.sparsegpt_percdamp=0.1"]),
    "foresight_obs_d0.3": ("ForeSight + OBS, damping 0.3", ["prune.sparsegpt_percdamp=0.3"]),
    "foresight_obs_64w": ("ForeSight + OBS, damping 0.01, 64 calibration windows", ["data.calib_samples=64"]),
    "sparsegpt_d0.01": ("SparseGPT, damping 0.01 (its default)", SPARSEGPT),
    "sparsegpt_d0.1": ("SparseGPT, damping 0.1", [*SPARSEGPT, "prune.sparsegpt_percdamp=0.1"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import cells  # noqa: E402  (the method table's fp32 model copy)

    model_ov = cells.model_override()
    base = ["data.calib_samples=32", "prune.propagate=pruned_first", "eval.tasks=[]", "prune.sparsity=0.5", *model_ov]
    cfg_path = os.path.join(ROOT, "configs", "default_health.yaml")
    cfg0 = load_config(cfg_path, base)
    tok = loading.load_tokenizer(cfg0.model)
    vcfg = load_config(cfg_path, [*base, "data.train=health_valid", "data.calib_samples=32", "data.seed=1"])
    valid = build_train_data(vcfg, tok, None).calib_ids
    done = json.load(open(CACHE)) if os.path.exists(CACHE) else {}
    for name in names:
        if name in done:
            continue
        cfg = load_config(cfg_path, [*base, *VARIANTS[name][1]])
        calib = build_train_data(cfg, tok, None).calib_ids
        with tempfile.TemporaryDirectory() as work:
            model = wrap_lora(loading.load_model(cfg.model, seed=0), cfg.lora).eval()
            pruner = Pruner(cfg.prune, batch_size=calibration_batch(cfg.train), progress=False, work_dir=work)
            t = time.perf_counter()
            pruner.step(model, calib, cfg.prune.sparsity)
            dt = time.perf_counter() - t
            done[name] = {"valid_ppl": perplexity(model, valid), "calib_ppl": perplexity(model, calib[:16]),
                          "prune_s": dt}
        print(f"[oneshot_damping] {name}: {done[name]}", flush=True)
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        atomic_write_json(CACHE, done)
    rows = [n for n in VARIANTS if n in done]
    ref = done.get("foresight_obs_d0.01")
    md = ["One-shot 50% on the base SmolLM2-135M (no training), shipped health config (ForeSight + OBS, "
          "`pruned_first`) or SparseGPT; perplexity on 32 `health_valid` windows and on the first 16 "
          "calibration windows (`python bench/oneshot_damping.py`).", "",
          "| variant | health_valid ppl | calibration ppl | valid / calibration | valid vs shipped |",
          "|---|---|---|---|---|"]
    for n in rows:
        r = done[n]
        rel = f"{r['valid_ppl'] / ref['valid_ppl']:.3f}×" if ref else "–"
        md.append(f"| {VARIANTS[n][0]} | {r['valid_ppl']:.2f} | {r['calib_ppl']:.2f} | "
                  f"{r['valid_ppl'] / r['calib_ppl']:.3f} | {rel} |")
    atomic_write_json(os.path.join(OUT, "oneshot_damping.json"),
                      {"base_overrides": base, "variants": {n: {"label": VARIANTS[n][0], "overrides": VARIANTS[n][1],
                                                                 **done[n]} for n in rows}})
    atomic_write_text(os.path.join(OUT, "oneshot_damping.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
