"""Seconds to load the packaged SmolLM2 (model + tokenizer) from its GGUF file and through the dequantised copy
(``model.gguf_cache``), in one process, best of ``--repeats``; the copy is made first (into a fresh cache folder,
timed too) and checked equal to the GGUF load, tensor for tensor.

    python bench/gguf_load.py [--repeats 3]

Writes ``bench/results/gguf_load.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ["XPERT_DIST_CACHE"] = tempfile.mkdtemp(prefix="gguf_load_")
    import torch

    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import gguf_plain_copy, load_model, load_tokenizer
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    torch.set_num_threads(1)
    gguf, cached = ModelConfig(name_or_path="smollm2", gguf_cache=False), ModelConfig(name_or_path="smollm2")

    def load(cfg):
        t0 = time.perf_counter()
        m, _ = load_model(cfg), load_tokenizer(cfg)
        return time.perf_counter() - t0, m

    t0 = time.perf_counter()
    gguf_plain_copy(cached)
    make_s = time.perf_counter() - t0
    runs = {"gguf file": [], "dequantised copy": []}
    for _ in range(args.repeats):
        for label, cfg in (("gguf file", gguf), ("dequantised copy", cached)):
            s, m = load(cfg)
            runs[label].append(s)
    a, b = load_model(gguf).state_dict(), load_model(cached).state_dict()
    equal = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    res = {"repeats": args.repeats, "make_copy_s": make_s, "seconds": runs,
           "best_s": {k: min(v) for k, v in runs.items()}, "weights_equal": equal, "threads": 1,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    md = (f"SmolLM2-135M-Instruct, model + tokenizer, one process, 1 torch thread, best of {args.repeats} "
          f"({res['when']}; `python bench/gguf_load.py`)\n\n| load | best s | all s |\n|---|---|---|\n"
          + "".join(f"| {k} | {min(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |\n" for k, v in runs.items())
          + f"\nMaking the copy (once per machine): {make_s:.1f} s. Weights through the copy equal the GGUF load's "
            f"tensor for tensor: {equal}.\n")
    atomic_write_json(os.path.join(ROOT, "bench", "results", "gguf_load.json"), res)
    atomic_write_text(os.path.join(ROOT, "bench", "results", "gguf_load.md"), md)
    print(md)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
