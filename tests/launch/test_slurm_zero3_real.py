"""``sbatch slurm/cpu_tiny.sh`` with ``DS_CONFIG=ds_configs/zero3.json`` and the packaged SmolLM2 (GGUF):
the path of ``slurm/prune_70b.sh`` (slurm/common.sh, srun, ZeRO-3 over 2 ranks) with a real model,
which loads through HfDeepSpeedConfig, runs the shipped gradual schedule (two in-loop prune steps at
this length, the mask moving between them, then the masked adapter) and must export from rank 0 without a hang. The export
reloads with plain transformers and every pruned matrix has exactly the target sparsity."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from xpert_dist.launch import sbatch

from .conftest import REPO

pytestmark = pytest.mark.slow

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.e2e
def test_sbatch_zero3_smollm2(slurm_cluster, tmp_path):
    out = tmp_path / "smollm2_zero3"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "XPERT_DIST_TIMEOUT_S": "180"}
    job = sbatch.submit("slurm/cpu_tiny.sh",
                        [str(REPO / "configs" / "default_health.yaml"), f"output_dir={out}", "train.max_steps=3",
                         "train.batch_size=2", "train.warmup_steps=1",
                         "data.calib_samples=4",
                         "data.seq_len=64", "lora.dropout=0", "eval.tasks=[]", "eval.perplexity_windows=2",
                         "eval.perplexity_seq_len=64", "prune.offload=none",
                         "eval.base_reference=false"],
                        # the shipped pruning as configured: ForeSight + OBS, LR rewinding, prune_steps=4 on the
                        # cubic ramp with the mask final at 2/3 of training (at 3 steps: two prune steps)
                        layout="1x2", log=str(tmp_path / "job.out"), ds_config="ds_configs/zero3.json", env=env,
                        extra=["--time=00:20:00", "--no-requeue"])
    state = sbatch.wait(job, timeout_s=900)
    # two ranks write this log: one's write can split the other's multi-byte character (a progress bar's)
    log = (tmp_path / "job.out").read_text(errors="replace") if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", f"job {job}: {state}\n{log[-4000:]}"
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["config"]["ds_config"].endswith("zero3.json")
    # the ramp ran under srun: 7/8 of the target, then all of it (0.4 * (1 - (1 - k/2)^3)), then the check
    in_loop = [r for r in res["prune_reports"] if not r["final"]]
    assert [r["target_sparsity"] for r in in_loop] == pytest.approx([0.4 * 7 / 8, 0.4], abs=1e-9)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    n = 0
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            assert int((p == 0).sum()) == round(0.4 * p.numel()), name
            n += 1
    assert n == 7 * model.config.num_hidden_layers
