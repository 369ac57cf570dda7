#!/usr/bin/env python
"""What the domain experts keep of general text: WikiText-2 *validation* perplexity (the ``general`` alias, a
validation split, never a test file) of the method table's exported models, beside the base model's.

    python bench/method_table/general_ppl.py [--cells health-xpert_default-s40,...] [--windows 32]

Reads each cell's exported ``model/`` from the method table's cache (a cell whose folder is not on this machine
is listed as missing, not evaluated); 32 windows of 256 tokens, one torch thread, cached per cell in
``bench/results/general_ppl.json``; writes that file and ``general_ppl.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cells  # noqa: E402

DEFAULT_CELLS = [f"{d}-{m}-s{p}" for p in (40, 50) for d in ("health", "legal")
                 for m in ("xpert_gradual_carry_ste", "sparsegpt_masked_lora_c128")]


def evaluate(model_dir: Path, windows: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xpert_dist.eval.perplexity import heldout_windows, perplexity

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return perplexity(model, heldout_windows("general", tok, 256, windows), progress=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS))
    ap.add_argument("--windows", type=int, default=32)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(cells.ROOT))
    out_json = cells.OUT / "general_ppl.json"
    done = json.loads(out_json.read_text()) if out_json.is_file() else {}
    rows = done.get("rows", {}) if done.get("windows") == args.windows else {}
    base_dir = Path(cells.model_override()[0].split("=", 1)[1])  # the fp32 weights every cell starts from
    missing = []
    for name in ["base", *[c for c in args.cells.split(",") if c]]:
        if name in rows:
            continue
        model_dir = base_dir if name == "base" else cells.CACHE / name / "model"
        if not (model_dir / "config.json").is_file():
            missing.append(name)
            continue
        t0 = time.time()
        rows[name] = evaluate(model_dir, args.windows)
        print(f"[general_ppl] {name}: {rows[name]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    base = rows.get("base")
    lines = [f"WikiText-2 validation perplexity ({args.windows} windows of 256 tokens) of the method table's exported "
             "models; retention = base / model.", "", "| model | perplexity | retention vs the base model |",
             "|---|---|---|"]
    for name, ppl in rows.items():
        lines.append(f"| {name} | {ppl:.3f} | {base / ppl:.1%} |" if base else f"| {name} | {ppl:.3f} | – |")
    if missing:
        lines += ["", "Not on this machine (no exported model in the cache): " + ", ".join(missing) + "."]
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    cells.OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_json, {"windows": args.windows, "rows": rows})
    atomic_write_text(cells.OUT / "general_ppl.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
