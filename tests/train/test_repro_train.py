"""Training runs across world sizes, the single process as the oracle (tiny Llama, 2 gloo ranks).

* ``train.reproducible=true``: 1 process and 2 ranks (spawned, the same config) give bit-equal
  losses at every step, bit-equal masks from the in-loop and final prune steps, and bit-equal
  exported weights, with LoRA dropout on (seeded per global leaf).
* Default mode, the same config: both read the same rows per step, so the losses agree to float
  noise (the reductions differ in order only).
"""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import SHARED_DATA, free_port

pytestmark = pytest.mark.slow


def _cfg(out, dropout=0.1, **train):
    from xpert_dist.config import config_from_dict

    return config_from_dict({
        "name": "repro", "output_dir": str(out), "model": {"tiny": {}}, "lora": {"dropout": dropout},
        "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 32,
                 "max_train_samples": 48, "calib_samples": 8},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, **train},
        "prune": {"sparsity": 0.5, "schedule": "steps", "prune_every": 2, "pbs": "diagonal"},
        "eval": {"perplexity_windows": 1, "perplexity_seq_len": 32, "tasks": []}})


def _worker(rank, world, port, out, dropout, train):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", XPERT_DIST_TIMEOUT_S="120")
    from xpert_dist.launch.runner import run_job

    run_job(_cfg(out, dropout, **train), progress=False)


def _two_ranks(out, dropout=0.1, **train):
    mp.start_processes(_worker, args=(2, free_port(), str(out), dropout, train), nprocs=2, join=True,
                       start_method="spawn")


def _read(out):
    from safetensors.torch import load_file

    res = json.loads((out / "results.json").read_text())
    man = json.loads((out / "manifest.json").read_text())
    return res, man, load_file(str(out / "model" / "model.safetensors"))


def test_reproducible_mode_is_bit_identical_across_world_sizes(tmp_path):
    from xpert_dist.train import pipeline

    _two_ranks(tmp_path / "ws2", reproducible=True)
    pipeline.run(_cfg(tmp_path / "ws1", reproducible=True), progress=False)
    (r1, m1, w1), (r2, m2, w2) = _read(tmp_path / "ws1"), _read(tmp_path / "ws2")
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert r1["prune_steps"] == [2] and len(r1["loss_history"]) == 4
    assert r2["loss_history"] == r1["loss_history"]  # every step's loss, bit for bit
    assert len(m1["mask_sha256"]) == 14 and m2["mask_sha256"] == m1["mask_sha256"]
    assert w1.keys() == w2.keys()
    differ = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert not differ, f"exported weights differ: {differ[:5]}"
    assert m2["metrics"] == m1["metrics"]


def test_default_mode_same_rows_losses_within_float_noise(tmp_path):
    """The same config (global batch 4: 4 rows in one forward vs 2 per rank, dropout off, whose noise
    is drawn per rank outside the reproducibility mode): losses agree to float32 noise."""
    from xpert_dist.train import pipeline

    _two_ranks(tmp_path / "ws2", dropout=0.0, threads=1)
    pipeline.run(_cfg(tmp_path / "ws1", dropout=0.0, threads=1), progress=False)
    (r1, m1, _), (r2, m2, _) = _read(tmp_path / "ws1"), _read(tmp_path / "ws2")
    steps1, l1 = zip(*r1["loss_history"])
    steps2, l2 = zip(*r2["loss_history"])
    assert steps1 == steps2 == (1, 2, 3, 4)
    rel = [abs(a - b) / a for a, b in zip(l1, l2)]
    assert max(rel) < 1e-5, rel  # another batch would be ~1e-2 apart already at step 1
    assert len(m2["mask_sha256"]) == len(m1["mask_sha256"]) == 14
