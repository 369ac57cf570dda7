#!/usr/bin/env python
"""Cost of the masked adapter (W⊙M + s·(BA)⊙M) against plain LoRA, per training step, on SmolLM2-135M.

    python bench/method_table/masked_cost.py [--steps 3] [--threads 1] [--dropout 0.0]

One process, one model: training steps of 4 × 256 tokens (the method table's batch), LoRA r=8 on
all seven linears, alternating plain LoRA, the masked adapter (40% random masks on every LoRA layer)
as shipped (the fused ``maths/masked_linear`` function: one merged matmul when dropout is 0), the same with
its weight gradient ``G = gᵀx`` in bfloat16 (``prune.masked_grad_dtype=bfloat16``), the same with plain
LoRA's adapter gradients and no ``G`` (``prune.masked_grad=straight_through``), and the
unfused autograd graph it replaced, after one warm-up step each, so all see the same machine load. CPU time (process_time, all
threads) is the less load-sensitive measure on a shared machine; wall time is reported too.
Writes ``bench/results/masked_cost.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "oneshot"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (the domain configs ship 0)")
    args = ap.parse_args()
    import torch

    import common  # noqa: E402
    import prepare  # noqa: E402
    from xpert_dist.config import LoraSettings, ModelConfig
    from xpert_dist.models import lora, structure as st
    from xpert_dist.models.loading import load_model
    from xpert_dist.prune.adapter import lora_layers

    torch.set_num_threads(args.threads)
    prepare.convert_model()
    model = lora.wrap_lora(load_model(ModelConfig(name_or_path=str(common.model_dir()))), LoraSettings(dropout=args.dropout))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (4, 256), generator=g)
    layers = lora_layers(model)
    masks = [torch.rand(st.base_linear(m).weight.shape, generator=g) >= 0.4 for m in layers]

    fused = lora._fused_path

    def set_mode(mode: str) -> None:
        lora._fused_path = fused if mode != "masked_unfused" else (lambda *a: None)  # unfused: old graph
        for m, keep in zip(layers, masks):
            if mode != "lora":
                lora.mask_delta(m, keep, grad_dtype=torch.bfloat16 if mode == "masked_bf16" else None,
                                straight_through=mode == "masked_ste")
            else:
                lora.unmask_delta(m)

    def one_step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    runs = {"lora": [], "masked": [], "masked_bf16": [], "masked_ste": [], "masked_unfused": []}
    for mode in runs:  # warm-up
        set_mode(mode)
        one_step()
    for _ in range(args.steps):
        for mode in runs:
            set_mode(mode)
            runs[mode].append(one_step())
    summary = {m: {"wall_s": statistics.median(w for w, _ in r), "cpu_s": statistics.median(c for _, c in r),
                   "steps": len(r)} for m, r in runs.items()}
    for mode in ("masked", "masked_bf16", "masked_ste", "masked_unfused"):
        summary[mode]["wall_vs_lora"] = summary[mode]["wall_s"] / summary["lora"]["wall_s"]
        summary[mode]["cpu_vs_lora"] = summary[mode]["cpu_s"] / summary["lora"]["cpu_s"]
    out = ROOT / "bench" / "results"
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "masked_cost.json", {"args": vars(args), "summary": summary, "raw": runs})
    md = (f"SmolLM2-135M, 4 × 256 tokens per step, LoRA r=8 on 7 linears, dropout {args.dropout}, "
          f"{args.threads} thread(s); medians of "
          f"{args.steps} alternating steps after one warm-up each (bench/method_table/masked_cost.py).\n\n"
          "| adapter | wall s / step | CPU s / step | wall / LoRA | CPU / LoRA |\n|---|---|---|---|---|\n"
          f"| plain LoRA | {summary['lora']['wall_s']:.2f} | {summary['lora']['cpu_s']:.2f} | 1.00× | 1.00× |\n"
          + "".join(f"| {label} | {summary[m]['wall_s']:.2f} | {summary[m]['cpu_s']:.2f} | "
                    f"{summary[m]['wall_vs_lora']:.2f}× | {summary[m]['cpu_vs_lora']:.2f}× |\n"
                    for m, label in (("masked", "masked, as shipped (maths/masked_linear)"),
                                     ("masked_bf16", "masked, weight gradient in bf16 (prune.masked_grad_dtype)"),
                                     ("masked_ste", "masked, straight-through adapter gradients, no weight "
                                                    "gradient (prune.masked_grad)"),
                                     ("masked_unfused", "masked, unfused autograd graph (before)"))))
    atomic_write_text(out / "masked_cost.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
