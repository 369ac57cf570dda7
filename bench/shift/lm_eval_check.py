#!/usr/bin/env python
"""Check that lm-evaluation-harness, run on this project's task YAMLs, scores exactly what the
project's own evaluator scores: per-option log-likelihoods and acc / acc_norm on the same items.

    # 1. in an environment with lm_eval (see docs/analysis.md):
    lm_eval --model hf --model_args pretrained=MODEL_DIR,dtype=float32 --device cpu \
        --include_path xpert_dist/eval/lm_eval_tasks --tasks xpert_pubmedqa,xpert_casehold \
        --limit 20 --log_samples --output_path OUT
    # 2. in the project's venv:
    python bench/shift/lm_eval_check.py --model MODEL_DIR --samples OUT

Prints, per task, the largest absolute difference of an option's log-likelihood and both
accuracies; exits 1 when a log-likelihood differs by more than --atol.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", required=True, help="lm_eval --output_path (searched recursively)")
    ap.add_argument("--atol", type=float, default=1e-3)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xpert_dist.data.sources import load_records
    from xpert_dist.eval.multiple_choice import casehold_items, choice_accuracy, pubmedqa_items, score_items

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ok = True
    for task, alias, build in (("xpert_pubmedqa", "pubmedqa", pubmedqa_items), ("xpert_casehold", "casehold", casehold_items)):
        files = glob.glob(os.path.join(args.samples, "**", f"samples_{task}_*.jsonl"), recursive=True)
        if not files:
            print(f"{task}: no lm_eval samples found, skipped")
            continue
        samples = sorted((json.loads(line) for line in open(sorted(files)[-1])), key=lambda s: s["doc_id"])
        ds = load_records(alias)
        items = build(ds.select([s["doc_id"] for s in samples]))
        ours = score_items(model, tok, items, batch_size=8, progress=False)
        theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        diff = max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t))
        acc = choice_accuracy(model, tok, items, batch_size=8, progress=False)
        lm_acc = sum(s["acc"] for s in samples) / len(samples)
        lm_norm = sum(s["acc_norm"] for s in samples) / len(samples)
        print(f"{task}: {len(samples)} items, max |loglik diff| {diff:.2e}; acc project {acc['acc']:.4f} "
              f"lm_eval {lm_acc:.4f}; acc_norm project {acc['acc_norm']:.4f} lm_eval {lm_norm:.4f}")
        ok &= diff <= args.atol and abs(acc["acc"] - lm_acc) < 1e-9 and abs(acc["acc_norm"] - lm_norm) < 1e-9
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
