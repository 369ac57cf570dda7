"""Time one in-loop prune step of the shipped health config on SmolLM2-135M, and where its time goes.

Side by side in one run, three settings of the shipped config (ForeSight + OBS reconstruction,
``propagate=pruned``: every block runs a statistics forward and, once pruned, a forward that recomputes
its outputs; the XᵀX carry): the reference, float32 calibration with every forward run whole
(``shortcuts=False``) and each batch's XᵀX as one full product (what prune steps did before 2026-12-07
evening); float32 as every prune step now runs (``stats/sequential.py``'s shortcuts: the statistics forward
stops at down_proj's input, adapters the step zeroed are skipped in the recompute, the last block is not
recomputed; ``stats/capture.gram_into``: XᵀX from the panels on and above the diagonal, mirrored), which
must leave the same model bit for bit; and bf16-autocast forwards (``prune.calib_dtype=bfloat16``) with
the shortcuts; and ``prune.propagate=true_sequential`` (each block calibrated input group by group on the groups
pruned before it, every linear run once: other statistics, so other masks, not the same bits). Each runs two
prune steps at the method table's budget (32 calibration windows of 256 tokens from the health training data,
40%); before each, every adapter ``B`` moves by a seeded random
step (what training between steps does), so the statistics forward meets live adapters as in a run.
Then one more step under cProfile, split into block forwards, ``XᵀX`` accumulation, the pruning maths
(scores, masks, OBS reconstruction) and the rest. Quality beside it: agreement of the bf16 masks with
float32's, and the perplexity of each pruned model (no training) on held-out ``health_valid`` windows.

    python bench/prune_step.py [--threads 1] [--windows 32] [--no-bf16] [--no-true-sequential]

Writes ``bench/results/prune_step.{json,md}``.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
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
from xpert_dist.prune import pruner as pruner_mod  # noqa: E402
from xpert_dist.stats import capture, sequential  # noqa: E402
from xpert_dist.train.data import build_train_data, calibration_batch  # noqa: E402
from xpert_dist.utils.atomic import atomic_write_text  # noqa: E402

OUT = os.path.join(ROOT, "bench", "results")
# (key, prune.calib_dtype, shortcuts and panel XᵀX, prune.propagate, column label)
SETTINGS = (("whole", "auto", False, "pruned", "float32, whole forwards, full XᵀX"),
            ("shortcuts", "auto", True, "pruned", "float32"),
            ("true_sequential", "auto", True, "true_sequential", "float32, propagate=true_sequential"),
            ("bf16", "bfloat16", True, "pruned", "bf16 autocast"))
GRAM_INTO = capture.gram_into


def full_product(flat, into, block=None):
    """The reference's XᵀX: one full product per batch (what accumulate ran before gram_into)."""
    part = flat.T @ flat
    return part if into is None else into.add_(part)


def _cum(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(v[3] for (f, _l, fn), v in stats.stats.items() if f.endswith(suffix) and fn == name)


def nudge_adapters(model, seed: int) -> None:
    """Stand-in for the training between prune steps: every LoRA B moves (seeded: the same in every setting)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)


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


def run_setting(cfg, calib, valid, dtype: str, shortcuts: bool, propagate: str) -> tuple[dict, dict, dict]:
    """Two timed prune steps and a profiled third on a fresh model; (row, state after two steps, masks)."""
    pruner_mod.sequential_calibration = functools.partial(sequential.sequential_calibration, shortcuts=shortcuts)
    capture.gram_into = GRAM_INTO if shortcuts else full_product
    sparsity = cfg.prune.sparsity
    with tempfile.TemporaryDirectory() as work:
        model = loading.load_model(cfg.model, seed=0)
        torch.manual_seed(0)  # the LoRA initialisation: the same in every setting
        model = wrap_lora(model, cfg.lora).eval()
        pruner = pruner_mod.Pruner(dataclasses.replace(cfg.prune, calib_dtype=dtype, propagate=propagate),
                                   batch_size=calibration_batch(cfg.train), progress=False, work_dir=work)
        times = []
        for step in range(2):
            nudge_adapters(model, step)
            t = time.perf_counter()
            pruner.step(model, calib, sparsity)
            times.append(time.perf_counter() - t)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        nudge_adapters(model, 2)
        prof = profile_step(pruner, model, calib, sparsity)
        masks = {k: v.clone() for k, v in pruner.masks.items()}
        row = {"first_step_s": times[0], "second_step_s": times[1], **prof,
               "valid_ppl_pruned": perplexity(model, valid)}
    return row, state, masks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=32, help="calibration windows per prune step")
    ap.add_argument("--valid-windows", type=int, default=16)
    ap.add_argument("--no-bf16", action="store_true",
                    help="leave out the bf16-autocast setting (on a CPU without bf16 matmul units it is the slowest)")
    ap.add_argument("--no-true-sequential", action="store_true", help="leave out the propagate=true_sequential setting")
    args = ap.parse_args()
    if args.threads < 1 or args.windows < 1:
        ap.error("--threads and --windows must be >= 1")
    torch.set_num_threads(args.threads)
    overrides = [f"data.calib_samples={args.windows}", "eval.tasks=[]"]
    config = os.path.join(ROOT, "configs", "default_health.yaml")
    cfg = load_config(config, overrides)
    tok = loading.load_tokenizer(cfg.model)
    calib = build_train_data(cfg, tok, None).calib_ids[:args.windows]  # the first prune step's windows
    valid_cfg = load_config(config, [*overrides, "data.train=health_valid", f"data.calib_samples={args.valid_windows}",
                                     "data.calib_sets=1", "data.seed=1"])
    valid = build_train_data(valid_cfg, tok, None).calib_ids
    rows, states, masks = {}, {}, {}
    settings = [st for st in SETTINGS if not (args.no_bf16 and st[0] == "bf16")
                and not (args.no_true_sequential and st[0] == "true_sequential")]
    for key, dtype, shortcuts, propagate, _label in settings:
        rows[key], states[key], masks[key] = run_setting(cfg, calib, valid, dtype, shortcuts, propagate)
        print(f"[prune_step] {key}: {rows[key]}", flush=True)
    same = all(torch.equal(states["whole"][k], states["shortcuts"][k]) for k in states["whole"])
    bf16 = "bf16" in rows
    agree = ({k: float((masks["shortcuts"][k] == masks["bf16"][k]).float().mean()) for k in masks["shortcuts"]}
             if bf16 else {})
    res = {"args": vars(args), "overrides": overrides, "sparsity": cfg.prune.sparsity, "calib_shape": list(calib.shape),
           "valid_shape": list(valid.shape), "rows": rows, "shortcuts_bit_identical_after_two_steps": same}
    if bf16:
        res.update(bf16_mask_agreement_min=min(agree.values()), bf16_mask_agreement_mean=sum(agree.values()) / len(agree))
    keys = [k for k, *_ in settings]
    ratio_cols = [k for k in keys if k != "whole"]
    names = {"shortcuts": "float32 / reference", "true_sequential": "true_sequential / reference",
             "bf16": "bf16 / reference"}
    md = [f"One SmolLM2-135M prune step (configs/default_health.yaml: {cfg.prune.sparsity:.0%}, ForeSight + "
          f"OBS reconstruction, the XᵀX carry; `prune.propagate` as each column says), {calib.shape[0]} calibration windows of "
          f"{calib.shape[1]} tokens, {args.threads} thread(s); before each step every adapter B moved by a seeded "
          "random step (no training). The reference: every forward whole and each batch's XᵀX one full product "
          "(prune steps before 2026-12-07 evening); float32: `propagate=pruned` as prune steps run it now; true_sequential: "
          "`prune.propagate=true_sequential`, what the domain configs ship since 2026-12-08 (its own statistics, so not the "
          "same bits). Ratios against the reference.", "",
          "| | " + " | ".join(label for k, *_, label in settings) + " | "
          + " | ".join(names[k] for k in ratio_cols) + " |",
          "|---" * (len(keys) + len(ratio_cols) + 1) + "|"]
    for key, label in (("first_step_s", "first prune step s"), ("second_step_s", "second prune step s"),
                       ("block_forwards_s", "profiled third step: block forwards s"),
                       ("xtx_s", "… XᵀX accumulation s"), ("pruning_maths_s", "… scores, masks, OBS s"),
                       ("other_s", "… the rest s")):
        vals = {k: rows[k][key] for k in keys}
        md.append(f"| {label} | " + " | ".join(f"{vals[k]:.1f}" for k in keys) + " | "
                  + " | ".join(f"{vals[k] / vals['whole']:.2f}×" for k in ratio_cols) + " |")
    vals = {k: rows[k]["valid_ppl_pruned"] for k in keys}
    md.append(f"| perplexity of the pruned model, {valid.shape[0]} health_valid windows (no training) | "
              + " | ".join(f"{vals[k]:.4f}" for k in keys) + " | "
              + " | ".join(f"{vals[k] / vals['whole']:.4f}×" for k in ratio_cols) + " |")
    md += ["", f"float32 as prune steps run against the reference, after two steps: every parameter bit-identical: "
               f"**{same}**."]
    if bf16:
        md.append(f"bf16 masks against float32's (share of entries, over the {len(agree)} matrices): min "
                  f"{res['bf16_mask_agreement_min']:.5f}, mean {res['bf16_mask_agreement_mean']:.5f}.")
    else:
        md.append("bf16 autocast not run (`--no-bf16`).")
    if "true_sequential" in rows:
        ts = {k: float((masks["shortcuts"][k] == masks["true_sequential"][k]).float().mean()) for k in masks["shortcuts"]}
        res.update(true_sequential_mask_agreement_min=min(ts.values()),
                   true_sequential_mask_agreement_mean=sum(ts.values()) / len(ts))
        md.append(f"true_sequential masks (its own statistics) against float32's, after three steps: min "
                  f"{res['true_sequential_mask_agreement_min']:.5f}, mean {res['true_sequential_mask_agreement_mean']:.5f}.")
    md.append("")
    os.makedirs(OUT, exist_ok=True)
    for name, text in (("prune_step.json", json.dumps(res, indent=2)), ("prune_step.md", "\n".join(md))):
        atomic_write_text(os.path.join(OUT, name), text)
    print("\n".join(md))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
