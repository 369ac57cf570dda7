#!/usr/bin/env python
"""Multiple-choice scoring cost: the prompt computed once per item (packed rows, block-causal mask) against
one row per option, side by side on SmolLM2-135M (fp32) and the first N CaseHOLD test items.

    python bench/choice_packing.py [--items 16] [--batch 8]

Both paths score the same items in the same process, alternating; reports CPU seconds per item, the
largest |difference| of the option log-likelihoods and whether every item's argmax agrees.
Writes ``bench/results/choice_packing.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "oneshot"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    import common
    import prepare
    from xpert_dist.data.sources import load_records
    from xpert_dist.eval import multiple_choice as mc
    from xpert_dist.models.loading import load_tokenizer
    from xpert_dist.config import ModelConfig

    prepare.convert_model()
    model = AutoModelForCausalLM.from_pretrained(common.model_dir(), dtype=torch.float32).eval()
    tok = load_tokenizer(ModelConfig(name_or_path=str(common.model_dir())))
    items = mc.casehold_items(load_records("casehold").select(range(args.items)))
    real_ok = mc._packs_ok
    out = {}
    for name, ok in (("one row per option", False), ("prompt once (packed)", True)):
        mc._packs_ok = (lambda m: ok)
        c0, t0 = time.process_time(), time.perf_counter()
        scores = mc.score_items(model, tok, items, batch_size=args.batch, progress=False)
        out[name] = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "scores": scores}
        print(f"[choice_packing] {name}: {out[name]['cpu_s']:.1f} CPU s", flush=True)
    mc._packs_ok = real_ok
    a, b = (out[k]["scores"] for k in out)
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    agree = all(max(range(len(ra)), key=ra.__getitem__) == max(range(len(rb)), key=rb.__getitem__)
                for ra, rb in zip(a, b))
    plain, packed = out["one row per option"], out["prompt once (packed)"]
    res = {"items": args.items, "batch": args.batch, "threads": torch.get_num_threads(),
           "cpu_s": {k: v["cpu_s"] for k, v in out.items()}, "wall_s": {k: v["wall_s"] for k, v in out.items()},
           "speedup_cpu": plain["cpu_s"] / packed["cpu_s"], "max_abs_loglik_diff": diff, "argmax_agree": agree}
    (common.RESULTS / "choice_packing.json").write_text(json.dumps(res, indent=2))
    md = (f"# Multiple-choice scoring: prompt once vs one row per option\n\nSmolLM2-135M fp32, the first "
          f"{args.items} CaseHOLD test items (5 holdings each), batch {args.batch} items, "
          f"{res['threads']} thread(s), one process, the two paths one after the other.\n\n"
          "| path | CPU s | CPU s per item | wall s |\n|---|---|---|---|\n"
          + "".join(f"| {k} | {v['cpu_s']:.1f} | {v['cpu_s'] / args.items:.2f} | {v['wall_s']:.1f} |\n"
                    for k, v in out.items())
          + f"\nSpeed-up (CPU): **{res['speedup_cpu']:.2f}×**. Largest |difference| of an option's log-likelihood: "
            f"{diff:.2e}; every item's chosen option the same: {agree}.\n")
    (common.RESULTS / "choice_packing.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
