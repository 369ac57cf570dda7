#!/usr/bin/env python
"""The reproducibility matrix on the local two-node SLURM cluster (.ci/slurm-up.sh), one report.

    bash .ci/slurm-up.sh && python bench/repro_matrix.py [--out-dir runs/bench/repro_matrix]

The same run config (tiny Llama, 8 optimizer steps of a global batch of 4 rows, ForeSight + PBS
pruning every 3 steps, checkpoints every 2 steps) submitted with ``sbatch slurm/cpu_tiny.sh``
(plain torch, gloo) on these layouts:

* reproducibility mode (``train.reproducible=true``, LoRA dropout 0.1 seeded per global leaf):
  ``1`` (one process), ``1x2`` (one node, 2 ranks), ``2x1`` (nodes xn1 and xn2, one rank each),
  a rerun of ``1``, and a ``2x1`` job preempted at step 4 while both ranks train (USR1 to every
  rank, as SLURM sends before the time limit: checkpoint, requeue, resume, finish);
* default mode (LoRA dropout 0, whose noise is otherwise drawn per rank): ``1``, ``1x2``, ``2x1``.

Every run is compared with the mode's single process (launchers/repro.py: masks entry by entry,
losses per step, metrics, a verdict). Writes ``bench/results/repro.json`` and ``repro.md``. This
is the local-cluster equivalent of ``launchers/submit.py repro --layouts 1x1,1x2,2x1 --repeats 1``
plus the preempted run (submitit cannot inject a preemption at a chosen step).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"
TRAIN_DATA = str(ROOT.parent / "shared" / "data" / "health" / "medquad_train.jsonl")
PAUSE_AT_POLL = 4


def config(out: Path) -> dict:
    return {"model": {"tiny": {}}, "lora": {"dropout": 0.1},
            "data": {"train": TRAIN_DATA, "seq_len": 32, "max_train_samples": 64, "calib_samples": 8},
            "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2},
            "prune": {"sparsity": 0.5, "schedule": "steps", "prune_every": 3, "pbs": "diagonal"},
            "eval": {"perplexity_windows": 2, "perplexity_seq_len": 32, "tasks": []}, "output_dir": str(out)}


def wait_paused(job: str, flags: list[Path], timeout_s: float = 400) -> None:
    from xpert_dist.launch import sbatch

    deadline = time.monotonic() + timeout_s
    while not all(f.exists() for f in flags):
        if not sbatch.queue_state(job):
            raise SystemExit(f"job {job} left the queue before pausing at poll {PAUSE_AT_POLL}")
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            raise SystemExit(f"job {job} did not pause within {timeout_s} s")
        time.sleep(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "bench" / "repro_matrix"))
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--only", help="comma-separated labels to (re)submit; the others' finished runs are reused "
                                   "(their job records from <out-dir>/jobs.json)")
    ap.add_argument("--report-only", action="store_true", help="submit nothing: the report from <out-dir>/jobs.json")
    args = ap.parse_args(argv)
    from xpert_dist.launch import repro, sbatch
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    root = Path(args.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(config(root / "unused"), indent=1))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    fault = root / "fault"
    if fault.exists():  # pause flags of an earlier invocation would release the preemption at once
        subprocess.run(["rm", "-rf", str(fault)], check=True)
    fault_env = {**env, "XPERT_FAULT_PAUSE_AT_POLL": str(PAUSE_AT_POLL), "XPERT_FAULT_DIR": str(fault),
                 "XPERT_FAULT_PAUSE_TIMEOUT": "300"}
    R = ["train.reproducible=true"]
    D = ["lora.dropout=0.0"]
    plan = [("repro/1", "1", R, env), ("repro/1x2", "1x2", R, env), ("repro/2x1", "2x1", R, env),
            ("repro/1-rerun", "1", R, env), ("repro/2x1-preempted", "2x1", R, fault_env),
            ("default/1", "1", D, env), ("default/1x2", "1x2", D, env), ("default/2x1", "2x1", D, env)]
    record = root / "jobs.json"
    only = set() if args.report_only else set(args.only.split(",")) if args.only else None
    jobs = json.loads(record.read_text()) if only is not None and record.is_file() else {}
    t0 = time.monotonic()
    for label, layout, ov, e in plan:
        if only is not None and label not in only:
            continue
        out = root / label
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        log = root / f"{label.replace('/', '_')}.out"
        log.unlink(missing_ok=True)
        job = sbatch.submit("slurm/cpu_tiny.sh", [str(cfg), f"output_dir={out}", *ov], layout=layout, log=log, env=e)
        jobs[label] = {"job": job, "layout": layout, "dir": str(out), "log": str(log), "overrides": ov}
        print(f"{label}: job {job} ({layout})", flush=True)
    pre = jobs["repro/2x1-preempted"]
    if only is None or "repro/2x1-preempted" in only:
        wait_paused(pre["job"], [fault / "paused.rank0", fault / "paused.rank1"], timeout_s=args.timeout_s)
        subprocess.run(["scancel", "--signal=USR1", pre["job"]], check=True)
        pre["preempted_at_poll"] = PAUSE_AT_POLL
    for label, j in jobs.items():
        if only is not None and label not in only:
            continue
        j["state"] = sbatch.wait(j["job"], timeout_s=args.timeout_s)
        j["restarts"] = sbatch.restarts(j["job"])
        j["nodes"] = sbatch.nodes_of(j["job"])
        print(f"{label}: {j['state']} on {j['nodes']}, restarts {j['restarts']}", flush=True)
    seconds = time.monotonic() - t0
    submitted = [k for k in jobs if only is None or k in only]
    for k in submitted:  # which jobs ran side by side, and how long they took together
        jobs[k]["batch_jobs"], jobs[k]["batch_wall_s"] = len(submitted), seconds
    record.write_text(json.dumps(jobs, indent=1))
    failed = [k for k, j in jobs.items() if j["state"] != "COMPLETED"]
    if failed:
        raise SystemExit(f"jobs not COMPLETED: {failed}; logs under {root}")
    if jobs["repro/2x1-preempted"]["restarts"] < 1:
        raise SystemExit(f"the preempted job {pre['job']} was not requeued (restarts 0); see {pre['log']}")

    rmodes = ["repro/1", "repro/1x2", "repro/2x1", "repro/1-rerun", "repro/2x1-preempted"]
    dmodes = ["default/1", "default/1x2", "default/2x1"]
    rep_r = repro.compare_runs([jobs[k]["dir"] for k in rmodes], rmodes)
    rep_d = repro.compare_runs([jobs[k]["dir"] for k in dmodes], dmodes, require="noise")
    batches = sorted({(j["batch_jobs"], round(j["batch_wall_s"])) for j in jobs.values()}, reverse=True)
    result = {"config": config(Path("<per run>")), "jobs": jobs,
              "reproducible_mode": rep_r.to_dict(), "default_mode": rep_d.to_dict()}
    atomic_write_json(OUT / "repro.json", result)

    lines = ["# Reproducibility matrix on the local two-node SLURM cluster", "",
             "`python bench/repro_matrix.py` (tiny Llama, 8 steps, global batch 4, ForeSight + PBS every 3 "
             "steps, `sbatch slurm/cpu_tiny.sh`, plain torch + gloo); wall time on the shared 2-core machine: "
             + ", ".join(f"{n} job(s) submitted together, {w} s until all finished" for n, w in batches)
             + (" (the later batch resubmitted with --only)" if len(batches) > 1 else "") + ".", "",
             "| run | layout | nodes | restarts | final loss | mask fingerprint |", "|---|---|---|---|---|---|"]
    for rep in (rep_r, rep_d):
        for r in rep.runs:
            j = jobs[r.label]
            fp = repro.mask_fingerprint(r.masks)
            lines.append(f"| {r.label} | {j['layout']} | {','.join(j['nodes'])} | {j['restarts']} | "
                         f"{r.final_loss!r} | `{(fp or '—')[:16]}` |")
    lines += ["", "## Reproducibility mode (`train.reproducible=true`, LoRA dropout 0.1)", "",
              rep_r.markdown().split("\n", 2)[2], "## Default mode (LoRA dropout 0)", "",
              rep_d.markdown().split("\n", 2)[2]]
    atomic_write_text(OUT / "repro.md", "\n".join(lines))
    print("\n".join(lines))
    return 0 if rep_r.verdict == "identical" else 1


if __name__ == "__main__":
    sys.exit(main())
