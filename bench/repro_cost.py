#!/usr/bin/env python
"""What the reproducibility mode costs, and what it buys, on SmolLM2-135M (local processes).

    python bench/repro_cost.py [--steps 6] [--out-dir runs/bench/repro_cost]

The same config (health, 4 rows x 128 tokens per optimizer step, ForeSight + diagonal PBS pruning
every 2 steps, LoRA dropout 0, 1 torch thread per process) in the default mode and with
``train.reproducible=true``, each on 1 process and on ``torchrun --nproc_per_node 2``, plus a rerun
of the reproducible single process. One run at a time (their times are their own). Records the
training time (wall and process CPU, prune steps excluded) per mode and world size, and the
comparison of the runs (launchers/repro.py's verdicts): the default mode's measured noise
between 1 and 2 ranks, and whether the reproducible runs are identical. Writes
``bench/results/repro_cost.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"


def overrides(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", "train.batch_size=4", "data.seq_len=128", "data.calib_samples=4",
            "prune.schedule=steps", f"prune.prune_every={max(1, steps // 2)}", "prune.prune_steps=0", "prune.pbs=diagonal", "prune.reconstruct=off",
            "lora.dropout=0.0", "train.threads=1", "eval.perplexity_windows=1", "eval.perplexity_seq_len=128",
            "eval.tasks=[]", "model.name_or_path=smollm2"]


def run(label: str, world: int, extra: list[str], out_dir: Path, steps: int, reuse: bool = False) -> dict:
    out = out_dir / label
    if reuse and (out / "results.json").is_file():  # a finished run of an earlier invocation
        res = json.loads((out / "results.json").read_text())
        t = res["timing"]
        return {"label": label, "world_size": world, "dir": str(out), "wall_s": None, "train_s": t["train_s"],
                "train_cpu_s": t["train_cpu_s"], "prune_s": t["prune_s"], "steps": len(res["loss_history"]),
                "final_loss": res.get("final_loss"), "reused": True}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "launchers/run.py", "--no-progress", "--config", "configs/default_health.yaml",
           *overrides(steps), *extra, f"output_dir={out}", f"name={label}"]
    if world > 1:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--nproc_per_node", str(world), "--master_port", str(random.randint(29600, 29999)),
               *cmd[1:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads((out / "results.json").read_text())
    t = res["timing"]
    return {"label": label, "world_size": world, "dir": str(out), "wall_s": wall, "train_s": t["train_s"],
            "train_cpu_s": t["train_cpu_s"], "prune_s": t["prune_s"], "steps": len(res["loss_history"]),
            "final_loss": res.get("final_loss")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-rerun", dest="rerun", action="store_false", help="skip the reproducible rerun")
    ap.add_argument("--reuse", action="store_true", help="keep runs that finished in an earlier invocation")
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "bench" / "repro_cost"))
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    from xpert_dist.launch import repro
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    plan = [("default-1x1", 1, []), ("default-1x2", 2, []),
            ("repro-1x1", 1, ["train.reproducible=true"]), ("repro-1x2", 2, ["train.reproducible=true"])]
    if args.rerun:
        plan.append(("repro-1x1-rerun", 1, ["train.reproducible=true"]))
    rows = []
    for label, world, extra in plan:
        rows.append(run(label, world, extra, out_dir, args.steps, args.reuse))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["label"]: r for r in rows}
    cost = {}
    for ws in ("1x1", "1x2"):
        d, r = by[f"default-{ws}"], by[f"repro-{ws}"]
        cost[ws] = {"train_s_ratio": r["train_s"] / d["train_s"], "train_cpu_s_ratio": r["train_cpu_s"] / d["train_cpu_s"]}
    default = repro.compare_runs([by["default-1x1"]["dir"], by["default-1x2"]["dir"]], ["default-1x1", "default-1x2"],
                                 require="noise")
    labels = [k for k in ("repro-1x1", "repro-1x2", "repro-1x1-rerun") if k in by]
    rep = repro.compare_runs([by[k]["dir"] for k in labels], labels)
    result = {"config": {"base": "configs/default_health.yaml", "overrides": overrides(args.steps)},
              "runs": rows, "cost_reproducible_vs_default": cost,
              "default_mode": default.to_dict(), "reproducible_mode": rep.to_dict()}
    atomic_write_json(OUT / "repro_cost.json", result)

    dt = default.comparisons[0]
    lines = ["# Reproducibility mode: cost and effect (SmolLM2-135M, local processes)", "",
             f"Config: `configs/default_health.yaml` + `{' '.join(overrides(args.steps))}`; "
             "one run at a time (of this bench) on a 2-core machine shared with other jobs (load average 10-20 while "
             "it ran), so wall times are noise and the CPU time (process time of rank 0, all its threads) is the "
             "measure; train time excludes prune steps.", "",
             "| run | ranks | train s | train CPU s | prune s | final loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['world_size']} | {r['train_s']:.1f} | {r['train_cpu_s']:.1f} | {r['prune_s']:.1f} "
              f"| {r['final_loss']!r} |" for r in rows]
    lines += ["", "| layout | reproducible / default, train wall | train CPU |", "|---|---|---|"]
    lines += [f"| {ws} | {c['train_s_ratio']:.2f}x | {c['train_cpu_s_ratio']:.2f}x |" for ws, c in cost.items()]
    t = dt.total
    lines += ["", f"**Default mode, 1 vs 2 ranks: {dt.verdict}** — masks differ in {len(dt.hash_mismatches)} "
              f"matrices, {t.differing:,} of {t.entries:,} entries ({t.fraction:.3g}), IoU of kept sets "
              f"{t.iou:.6f}; max relative loss difference {dt.loss_rel_max:.3g} (before the first prune step: {dt.pre_prune_loss_rel:.3g})."
              if t else f"**Default mode, 1 vs 2 ranks: {dt.verdict}**",
              "", f"**Reproducible mode, {' vs '.join(labels)}: {rep.verdict}** — "
              + "; ".join(f"{c.label}: {c.verdict}, losses bit-equal {c.losses_equal}, "
                          f"{len(c.hash_mismatches)} matrices differ" for c in rep.comparisons) + ".", ""]
    atomic_write_text(OUT / "repro_cost.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
