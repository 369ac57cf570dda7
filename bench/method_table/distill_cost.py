#!/usr/bin/env python
"""Time and memory of distillation (``prune.distill``: each mode) against the same run without it.

    python bench/method_table/distill_cost.py [--steps 8] [--prune-every 2] [--modes logits squarehead ...]

Runs of ``launchers/run.py`` on SmolLM2-135M with the method table's batch (4 × 256 tokens), the
health config, in-loop prune steps every ``--prune-every`` steps (the teacher is the model just before
the first one, so the last ``steps - prune_every`` steps are distilled), no evaluation; each run in its
own process so its peak RSS is its own. Reports training CPU time (process time, all threads: the less
load-sensitive measure on a shared machine), its per-distilled-step overhead, and the peak RSS after
training. Writes ``bench/results/distill_cost.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as table  # noqa: E402  (the method table: model, launch)

CACHE = table.ROOT / "bench" / "results" / "cache" / "distill_cost"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prune-every", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["logits", "squarehead", "logits+squarehead"],
                    choices=["logits", "squarehead", "logits+squarehead"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: one per core)")
    args = ap.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        table.THREADS.append(args.threads)
    table.MODEL.extend(table.model_override())
    common = [f"train.max_steps={args.steps}", "train.batch_size=4", "data.seq_len=256", "data.calib_samples=8",
              "prune.schedule=steps", f"prune.prune_every={args.prune_every}", "prune.prune_steps=0", "eval.tasks=[]",
              "eval.perplexity_windows=0", "eval.base_reference=false", *table.MODEL]
    runs = {}
    for mode in ("off", *args.modes):
        name = f"health-distill_{mode.replace('+', '_')}-t{args.steps}-p{args.prune_every}"
        out = CACHE / name
        if (out / "results.json").is_file():
            runs[mode] = json.loads((out / "results.json").read_text())
            continue
        res = table.launch(name, out, "health", [*common, f"prune.distill={mode}"], CACHE)
        if res is None:
            raise SystemExit(f"[distill_cost] {name} failed; see {CACHE / f'{name}.log'}")
        runs[mode] = res
    distilled = args.steps - args.prune_every
    off = runs["off"]
    base_step = off["timing"]["train_cpu_s"] / args.steps
    mem_off = off["memory"]["peak_rss_after_train_mb"]
    summary = {"cpu_s_per_plain_step": base_step, "distilled_steps": distilled, "modes": {}}
    rows = [f"| no distillation | {off['timing']['train_cpu_s']:.1f} | 1.00× | {mem_off:.0f} | 1.000× |"]
    for mode in args.modes:
        on = runs[mode]
        per_step = (on["timing"]["train_cpu_s"] - off["timing"]["train_cpu_s"]) / distilled
        mem_on = on["memory"]["peak_rss_after_train_mb"]
        summary["modes"][mode] = {
            "train_cpu_s": on["timing"]["train_cpu_s"], "train_cpu_ratio": on["timing"]["train_cpu_s"] /
            off["timing"]["train_cpu_s"], "cpu_s_per_distilled_step_overhead": per_step,
            "distilled_step_vs_plain": (base_step + per_step) / base_step,
            "peak_rss_after_train_mb": mem_on, "peak_rss_ratio": mem_on / mem_off}
        m = summary["modes"][mode]
        rows.append(f"| `prune.distill={mode}` | {on['timing']['train_cpu_s']:.1f} | "
                    f"{m['distilled_step_vs_plain']:.2f}× | {mem_on:.0f} | {m['peak_rss_ratio']:.3f}× |")
    summary["train_cpu_s_off"] = off["timing"]["train_cpu_s"]
    summary["peak_rss_after_train_mb_off"] = mem_off
    out = table.OUT
    (out / "distill_cost.json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=2))
    md = (f"SmolLM2-135M, health config, {args.steps} steps of 4 × 256 tokens, prune steps every {args.prune_every} "
          f"(teacher from the first: {distilled} distilled steps), no evaluation; one process per run, one "
          "after the other (bench/method_table/distill_cost.py).\n\n"
          "| run | training CPU s | a distilled step's CPU time / a plain step's | peak RSS after training (MiB) "
          "| / no distillation |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
          "The extra memory is the teacher's weights plus, for `logits`, one micro-batch of its logits "
          "(rows × seq × vocab × 4 B) and, for `squarehead`, its block outputs (layers × rows × seq × hidden × 4 B).\n")
    (out / "distill_cost.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
