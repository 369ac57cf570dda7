"""Peak memory of a prune step vs model depth, with DeepSpeed offload on/off, and statistics
accumulation throughput for 1 and 2 ranks (CPU, gloo, DeepSpeed ZeRO-3, fp32).

Models: random SmolLM2-width Llamas (h 576, I 1536, 9/3 heads, vocab 49152) with 4, 8, 16 and 30
blocks (30 = SmolLM2-135M's depth), LoRA r 8 on all seven linears. Per cell, every rank:

1. builds the model and the engine (``ds_configs/zero3.json``, or ``zero3_offload.json`` for
   offload=on: parameters and optimizer states offloaded to host memory);
2. accumulation only: sequential calibration with full XᵀX statistics of every block and the
   canonical-tree reduction to the owners (``TorchDistContext.reduce_stats``), no pruning ->
   tokens/s = calibration tokens x blocks / wall time (all ranks together);
3. resets the peak-RSS counter before each of two prune steps (``Pruner.step``: ForeSight + PBS
   diagonal) -> peak RSS (VmHWM, max over ranks) of the second (steady state: the EMA scores and
   masks of the first are held) and of the first, and the planner's prediction for the same cell.

Each finished cell is cached in bench/results/cache/ (resumable; ``--fresh`` to redo). Every cell
is sized to stay under ~2 minutes on this 2-core machine. Writes bench/results/memory_vs_depth.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import planner_validation as pv  # noqa: E402  (shared helpers: spawning, RSS, model, engine)

RESULTS, CACHE, MiB = pv.RESULTS, pv.CACHE, pv.MiB
DEPTHS = (4, 8, 16, 30)
BASE = dict(seq_len=128, calib_samples=8, calib_batch=2, glibc="fixed")
CELLS = ([dict(BASE, layers=L, world=2, offload=o) for L in DEPTHS for o in ("off", "on")]
         + [dict(BASE, layers=L, world=1, offload="off") for L in DEPTHS])


def cell_key(c) -> str:
    return f"mvd-L{c['layers']}-w{c['world']}-off{c['offload']}-s{c['seq_len']}-c{c['calib_samples']}-{c['glibc']}-p2"


def rank_cell(rank, world, cell):
    import torch

    torch.set_num_threads(1)
    from xpert_dist.distributed.comm import skip_shm_op_build

    skip_shm_op_build()
    import deepspeed  # noqa: F401

    from xpert_dist.config import PruneConfig
    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.prune.pruner import Pruner
    from xpert_dist.stats.sequential import sequential_calibration, shard_rows

    ctx = TorchDistContext(timeout_s=600)
    t0 = time.perf_counter()
    model = pv.build_model(cell["layers"])
    engine = pv.ds_engine(model, world, cell["calib_batch"],
                          "zero3_offload.json" if cell["offload"] == "on" else "zero3.json")
    model = engine.module
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, pv.SMOL["vocab_size"], (cell["calib_samples"], cell["seq_len"]), generator=g)
    bs = cell["calib_batch"]
    K = -(-calib.shape[0] // bs)

    # accumulation throughput: full statistics of every block + reduction to the owners
    ctx.barrier()
    t0 = time.perf_counter()
    sequential_calibration(model, shard_rows(calib, bs, ctx.shard(K)), lambda i, b, s: ctx.reduce_stats(s),
                           mode="full", batch_size=bs, recompute=False, progress=False)
    ctx.barrier()
    accumulate_s = time.perf_counter() - t0

    pruner = Pruner(PruneConfig(method="foresight", sparsity=0.5, pbs="diagonal"), ctx, batch_size=bs,
                    progress=False)
    peaks, times = [], []
    for _ in range(2):  # first step: no EMA/masks yet; second: the steady state of in-loop pruning
        pv.reset_peak()
        t0 = time.perf_counter()
        pruner.step(model, calib, 0.5)
        times.append(time.perf_counter() - t0)
        peaks.append(pv.hwm_bytes())
    ctx.barrier()
    return {"build_s": build_s, "accumulate_s": accumulate_s, "prune_s": times[1], "prune_peak_first": peaks[0],
            "prune_peak": peaks[1]}


def predict(cell) -> float:
    from xpert_dist.plan.memory import PlanSpec, estimate
    from xpert_dist.plan.shapes import ModelShape

    shape = ModelShape.from_config(dict(pv.SMOL, num_hidden_layers=cell["layers"]))
    on = cell["offload"] == "on"
    spec = PlanSpec(model=shape, nodes=1, gpus_per_node=cell["world"], zero_stage=3, accelerator="cpu",
                    dtype="float32", method="foresight", pbs="diagonal", lora_r=8, lora_dropout=0.05,
                    seq_len=cell["seq_len"], micro_batch=cell["calib_batch"], calib_samples=cell["calib_samples"],
                    calib_batch=cell["calib_batch"], offload_optimizer="cpu" if on else "none",
                    offload_params="cpu" if on else "none")
    return estimate(spec).peaks["prune"]["host"]


def run(cells, fresh=False) -> list[dict]:
    CACHE.mkdir(parents=True, exist_ok=True)
    out = []
    for cell in cells:
        path = CACHE / f"{cell_key(cell)}.json"
        if path.is_file() and not fresh:
            out.append(json.loads(path.read_text()))
            print(f"[cached] {cell_key(cell)}", flush=True)
            continue
        t0 = time.time()
        ranks = pv.spawn_ranks(rank_cell, cell["world"], cell, env=pv.GLIBC_ENV[cell["glibc"]])
        rec = {"cell": cell, "ranks": ranks, "wall_s": time.time() - t0}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, path)
        print(f"[done {rec['wall_s']:.0f}s] {cell_key(cell)}: prune peak "
              f"{max(r['prune_peak'] for r in ranks) / MiB:.0f} MiB", flush=True)
        out.append(rec)
    return out


def summarise(records) -> dict:
    rows = []
    for rec in records:
        c, ranks = rec["cell"], rec["ranks"]
        tokens = c["calib_samples"] * c["seq_len"] * c["layers"]
        acc = max(r["accumulate_s"] for r in ranks)
        pred = predict(c)
        meas = max(r["prune_peak"] for r in ranks)
        rows.append({"layers": c["layers"], "world": c["world"], "offload": c["offload"],
                     "prune_peak_mib": meas / MiB,
                     "first_prune_peak_mib": max(r["prune_peak_first"] for r in ranks) / MiB, "predicted_mib": pred / MiB,
                     "err_pct": 100 * (pred - meas) / meas, "prune_s": max(r["prune_s"] for r in ranks),
                     "accumulate_s": acc, "accumulate_tokens_per_s": tokens / acc,
                     "build_s": max(r["build_s"] for r in ranks), "cell_wall_s": rec["wall_s"]})
    rows.sort(key=lambda r: (r["world"], r["offload"], r["layers"]))
    return {"rows": rows, "records": records}


def write(res) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_vs_depth.json").write_text(json.dumps(res, indent=1))
    lines = ["# Prune-step memory vs depth, and statistics accumulation throughput (CPU, gloo, ZeRO-3, fp32)", "",
             "SmolLM2-width random Llamas, LoRA r 8; calibration 8 x 128 tokens in batches of 2; prune step = "
             "ForeSight + PBS diagonal over every block; peak of the second prune step (steady state, EMA and masks of "
             "the first held; the first step's peak in the last column). offload on = `ds_configs/zero3_offload.json` (parameters "
             "and optimizer in host memory; on a CPU-only machine that is the same memory, so it can only add "
             "copies). Accumulation = full XᵀX of every block + canonical-tree reduction, tokens counted once "
             "per block (8 x 128 x blocks), all ranks together. Peak RSS: VmHWM after a reset, max over ranks, "
             "glibc with a fixed mmap threshold; predicted: `xpert_dist.plan`, CPU case.", "",
             "| blocks | ranks | offload | prune peak MiB | predicted MiB | err % | prune s | accumulation tokens/s | "
             "1st prune step peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['layers']} | {r['world']} | {r['offload']} | {r['prune_peak_mib']:.0f} | "
                     f"{r['predicted_mib']:.0f} | {r['err_pct']:+.1f} | {r['prune_s']:.1f} | "
                     f"{r['accumulate_tokens_per_s']:.0f} | {r['first_prune_peak_mib']:.0f} |")
    (RESULTS / "memory_vs_depth.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--depths", type=int, nargs="*", default=list(DEPTHS))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    cells = [c for c in CELLS if c["layers"] in args.depths]
    if args.report_only:
        records = [json.loads((CACHE / f"{cell_key(c)}.json").read_text()) for c in cells
                   if (CACHE / f"{cell_key(c)}.json").is_file()]
    else:
        records = run(cells, fresh=args.fresh)
    res = summarise(records)
    write(res)
    print((RESULTS / "memory_vs_depth.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
