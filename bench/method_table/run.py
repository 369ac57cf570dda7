#!/usr/bin/env python
"""The EfficientXpert method table on SmolLM2-135M: every baseline and variant, side by side.

    python bench/method_table/run.py [--domains health,legal] [--sparsities 0.4,0.5] [--only NAME,...]

Each cell (domain × sparsity × method) is one run of ``launchers/run.py`` in its own process (so
its wall time and peak RSS are its own), with the same data, steps and evaluation as every other
cell of its domain; dense LoRA is the 100% reference of its domain. Finished cells are cached under
``bench/results/cache/method_table/`` and skipped on the next invocation, so the table can be
completed over several sittings. Writes ``bench/results/method_table.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / "results" / "cache" / "method_table"
OUT = ROOT / "bench" / "results"

# name -> overrides; every cell shares the domain config below
METHODS = {
    "dense_lora": ["prune.method=none"],
    "lora_wanda": ["prune.method=wanda", "prune.schedule=final_only", "prune.pbs=off"],
    "lora_sparsegpt": ["prune.method=sparsegpt", "prune.schedule=final_only", "prune.pbs=off"],
    "wanda_lora": ["prune.method=wanda", "prune.schedule=before_training", "prune.pbs=off"],
    "magnitude": ["prune.method=magnitude", "prune.pbs=off"],
    "foresight": ["prune.method=foresight", "prune.pbs=off"],
    "foresight_pbs_diag": ["prune.method=foresight", "prune.pbs=diagonal"],
    "foresight_pbs_full": ["prune.method=foresight", "prune.pbs=full"],
    "foresight_input_group": ["prune.method=foresight", "prune.pbs=diagonal", "prune.group=input"],
    "foresight_layer_group": ["prune.method=foresight", "prune.pbs=diagonal", "prune.group=layer"],
    "foresight_reference": ["prune.method=foresight", "prune.pbs=diagonal", "prune.variant=reference"],
}
SPARSITY_FREE = {"dense_lora"}
DOMAINS = {"health": ROOT / "configs" / "default_health.yaml", "legal": ROOT / "configs" / "default_legal.yaml"}
# the budget of every cell (same for all): overrides applied after the domain config
# (sized so that one cell takes ~5 minutes on an idle 2-core machine)
BUDGET = ["train.max_steps=20", "prune.prune_every=10", "data.calib_samples=16", "eval.max_task_examples=60",
          "eval.perplexity_windows=8"]


def cell_name(domain: str, method: str, sparsity: float) -> str:
    return f"{domain}-{method}" if method in SPARSITY_FREE else f"{domain}-{method}-s{int(round(sparsity * 100))}"


def run_cell(domain: str, method: str, sparsity: float, extra: list[str]) -> dict | None:
    name = cell_name(domain, method, sparsity)
    out = CACHE / name
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    cmd = [sys.executable, str(ROOT / "launchers" / "run.py"), "--config", str(DOMAINS[domain]), "--no-progress",
           f"name={name}", f"output_dir={out}", f"prune.sparsity={sparsity}", *BUDGET, *METHODS[method], *extra]
    print(f"[method_table] running {name}", flush=True)
    t0 = time.perf_counter()
    log = CACHE / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(["nice", "-n", "5", *cmd], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    if rc != 0:
        print(f"[method_table] {name} failed (rc {rc}); see {log}", flush=True)
        return None
    res = json.loads((out / "results.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(res))
    return res


def summarise(cells: dict[str, dict]) -> dict:
    from xpert_dist.eval.retention import retention

    table = {}
    for name, res in cells.items():
        domain = name.split("-")[0]
        dense = cells.get(f"{domain}-dense_lora")
        row = {"metrics": res.get("metrics", {}), "timing": res.get("timing", {}), "memory": res.get("memory", {})}
        if dense:
            row["retention"] = retention(res.get("metrics", {}), dense.get("metrics", {}))
            t_d = dense["timing"].get("train_s", 0) + dense["timing"].get("prune_s", 0)
            t_r = res["timing"].get("train_s", 0) + res["timing"].get("prune_s", 0)
            row["time_vs_lora"] = t_r / t_d if t_d else None
            row["peak_rss_vs_lora"] = res["memory"]["peak_rss_mb"] / dense["memory"]["peak_rss_mb"]
        table[name] = row
    return table


def markdown(table: dict) -> str:
    lines = ["| cell | domain retention | metrics | time / LoRA | peak RSS / LoRA |", "|---|---|---|---|---|"]
    for name, row in sorted(table.items()):
        ret = row.get("retention", {}).get("domain_retention")
        mets = ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items() if isinstance(v, (int, float)))
        t = row.get("time_vs_lora")
        m = row.get("peak_rss_vs_lora")
        lines.append(f"| {name} | {ret:.1%} | {mets} | {t:.2f}× | {m:.3f}× |" if ret is not None and t and m
                     else f"| {name} | – | {mets} | – | – |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="health,legal")
    ap.add_argument("--sparsities", default="0.4,0.5")
    ap.add_argument("--only", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every cell")
    args = ap.parse_args()
    methods = args.only.split(",") if args.only else list(METHODS)
    cells = {}
    for domain in args.domains.split(","):
        for s in (float(x) for x in args.sparsities.split(",")):
            for method in methods:
                name = cell_name(domain, method, s)
                if name in cells:
                    continue
                res = run_cell(domain, method, s, args.extra)
                if res is not None:
                    cells[name] = res
    for res_file in CACHE.glob("*/results.json"):  # include cells from earlier sittings
        cells.setdefault(res_file.parent.name, json.loads(res_file.read_text()))
    table = summarise(cells)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "method_table.json").write_text(json.dumps({"budget": BUDGET, "cells": table}, indent=2))
    md = markdown(table)
    (OUT / "method_table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
