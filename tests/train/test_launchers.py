"""The README's launch commands run the same code path: plain python, torchrun and the deepspeed
launcher (2 ranks, ZeRO-3 from ds_configs/zero3.json) end with identical masks, from the same
config (train.batch_size=2 is the global batch: 2 rows per step for 1 process, 1 per rank for 2)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, SHARED_DATA, free_port

pytestmark = pytest.mark.slow


def _config(tmp_path, out, batch_size):
    cfg = {"name": "launch", "output_dir": str(out), "model": {"tiny": {}}, "lora": {"dropout": 0.0},
           "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 32,
                    "max_train_samples": 48, "calib_samples": 8},
           "train": {"max_steps": 4, "batch_size": batch_size, "lr": 1e-3},
           "prune": {"sparsity": 0.5, "schedule": "steps", "prune_every": 2},
           "eval": {"perplexity_windows": 1, "perplexity_seq_len": 32, "tasks": []}}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_python_torchrun_deepspeed_agree(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    single = tmp_path / "single"
    _run([sys.executable, "launchers/run.py", "--no-progress", "--config", str(_config(tmp_path, single, 2))], tmp_path)
    tr = tmp_path / "torchrun"
    _run([os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
          "launchers/run.py", "--no-progress", "--config", str(_config(tmp_path, tr, 2))], tmp_path)
    ds = tmp_path / "deepspeed"
    proc = _run([os.path.join(bin_dir, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                 "launchers/run.py", "--no-progress", "--ds_config", "ds_configs/zero3.json",
                 "--config", str(_config(tmp_path, ds, 2))], tmp_path)
    assert "report:" in proc.stdout
    mans = {p.name: json.loads((p / "manifest.json").read_text()) for p in (single, tr, ds)}
    assert mans["single"]["world_size"] == 1 and mans["torchrun"]["world_size"] == 2
    assert mans["deepspeed"]["world_size"] == 2 and mans["deepspeed"]["config"]["ds_config"].endswith("zero3.json")
    assert len(mans["single"]["mask_sha256"]) == 14
    assert mans["torchrun"]["mask_sha256"] == mans["single"]["mask_sha256"]
    assert mans["deepspeed"]["mask_sha256"] == mans["single"]["mask_sha256"]
