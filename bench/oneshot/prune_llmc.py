"""One benchmark cell, llm-compressor: load the model, oneshot-prune it, save the pruned linear weights.

Runs in the separate venv .venv-llmc (llmcompressor pins its own transformers); it does not import
xpert_dist. Same model directory, same calibration tensor (one batch of 8 rows per step), same
targets (the seven linears of every block; lm_head ignored) as our cell.
    .venv-llmc/bin/python bench/oneshot/prune_llmc.py --calib general --pattern unstructured --method sparsegpt --out W.safetensors --meta M.json [--quick]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True, choices=common.CALIBS)
    ap.add_argument("--pattern", required=True, choices=common.PATTERNS)
    ap.add_argument("--method", required=True, choices=common.LLMC_METHODS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    calib = torch.load(common.calib_file(args.quick, args.calib))
    src = str(common.model_dir())
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(src)
    bs = common.BATCH_SIZE
    batches = [{"input_ids": calib[i:i + bs], "attention_mask": torch.ones_like(calib[i:i + bs])}
               for i in range(0, calib.shape[0], bs)]
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    common_kw = dict(sparsity=common.SPARSITY, mask_structure=structure, targets=["Linear"],
                     ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":  # block 128, damping 0.01: the same as our defaults
        modifier = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common_kw)
    else:
        modifier = WandaPruningModifier(**common_kw)
    os.chdir(Path(args.meta).parent)  # anything llm-compressor writes lands in the cache
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tok, dataset=loader, recipe=[modifier],
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], batch_size=bs)
    prune_s, prune_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rss_after_prune_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sd = model.state_dict()
    names = common.pruned_weight_names(model.config.num_hidden_layers)
    save_file({n: sd[n].detach().contiguous() for n in names}, args.out)
    common.write_json(Path(args.meta), {
        "prune_seconds": prune_s,
        "prune_cpu_seconds": prune_cpu_s,
        "process_seconds": time.perf_counter() - t_start,
        "peak_rss_after_prune_mib": rss_after_prune_kib / 1024,
        "torch_threads": torch.get_num_threads(),
        "llmcompressor_version": llmcompressor.__version__,
        "transformers_version": __import__("transformers").__version__,
        "options": {"method": args.method, "sparsity": common.SPARSITY, "mask_structure": structure,
                    "batch_size": bs, "modifier": repr(modifier)},
    })


if __name__ == "__main__":
    main()
