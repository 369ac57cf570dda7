"""Pipeline cells: the real entry point (``torchrun ... launchers/run.py``) on a random 70B-family Llama."""
from __future__ import annotations

import json
import os
import subprocess
import time

from bench.rehearsal_70b.common import CACHE, MALLOC_ENV, REPO, _atomic_json, llama_config

def pipeline(shape: str, layers: int = 1, method: str = "foresight", pbs: str = "full", fresh: bool = False) -> dict:
    """``torchrun --nproc_per_node 2 launchers/run.py --ds_config ds_configs/zero3.json`` on a random
    Llama of the cell's shape (``model.tiny``): 3 optimizer steps, an in-loop prune step before step 2,
    the final prune, export, reload of the export and a 2-window perplexity."""
    import random

    key = f"rh70-pipeline-{shape}-L{layers}-{method}-{pbs}"
    path = CACHE / f"{key}.json"
    if path.is_file() and not fresh:
        print(f"[cached] {key}", flush=True)
        return json.loads(path.read_text())
    out_dir = CACHE / f"{key}-run"
    cfg = {"name": key, "output_dir": str(out_dir),
           "model": {"tiny": llama_config(shape, layers)},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
           "data": {"train": "health", "seq_len": 64, "max_train_samples": 16, "calib_samples": 4},
           "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-4, "warmup_steps": 1, "log_every": 1},
           "prune": {"method": method, "sparsity": 0.5, "pbs": pbs, "schedule": "steps", "prune_every": 2,
                     "solver_dtype": "float32"},
           "eval": {"perplexity_windows": 2, "perplexity_seq_len": 64, "tasks": []}}
    cfg_path = CACHE / f"{key}.config.json"
    _atomic_json(cfg_path, cfg)
    port = random.randint(29600, 29999)
    cmd = [str(REPO / ".venv" / "bin" / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "launchers" / "run.py"), "--ds_config", str(REPO / "ds_configs" / "zero3.json"),
           "--config", str(cfg_path), "--no-progress"]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    rec = {"key": key, "shape": shape, "layers": layers, "method": method, "pbs": pbs, "command": cmd,
           "rc": proc.returncode, "wall_s": wall, "log_tail": (proc.stdout + proc.stderr)[-4000:]}
    res = out_dir / "results.json"
    if proc.returncode == 0 and res.is_file():
        r = json.loads(res.read_text())
        rec.update(timing=r.get("timing"), memory=r.get("memory"), prune_reports=r.get("prune_reports"),
                   sparsity=r.get("sparsity"), metrics=r.get("metrics"), loss_history=r.get("loss_history"),
                   exported=sorted(x.name for x in (out_dir / "model").iterdir()))
    _atomic_json(path, rec)
    print(f"[done rc={proc.returncode} {wall:.0f}s] {key}", flush=True)
    return rec
