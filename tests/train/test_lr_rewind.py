"""prune.lr_rewind: after each in-loop prune step the learning-rate schedule (warm-up, cosine to 10% of
the peak) starts again over the steps left. The learning rates the optimizer really used in a tiny run
are checked against hand-computed schedules, with and without rewinding."""
import math

import pytest
import torch

from xpert_dist.config import config_from_dict
from xpert_dist.train import pipeline

from helpers import SHARED_DATA


def cfg(out, rewind):
    return config_from_dict({
        "name": "rw", "output_dir": str(out), "model": {"tiny": {}}, "lora": {"dropout": 0.0},
        "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 32,
                 "max_train_samples": 24, "calib_samples": 4},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "tensorboard": False},
        "prune": {"method": "wanda", "sparsity": 0.5, "schedule": "steps", "prune_every": 3, "pbs": "off",
                  "lr_rewind": rewind},
        "eval": {"perplexity_windows": 1, "perplexity_seq_len": 32, "tasks": [], "base_reference": False}})


def cosine(frac):  # fraction of the peak after warm-up, decaying to 10%
    return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))


# 6 steps, warm-up 1, one in-loop prune step before step index 3 (then the mask is final)
PLAIN = [1.0, cosine(0 / 5), cosine(1 / 5), cosine(2 / 5), cosine(3 / 5), cosine(4 / 5)]
REWOUND = [1.0, cosine(0 / 5), cosine(1 / 5), 1.0, cosine(0 / 2), cosine(1 / 2)]


@pytest.mark.parametrize("rewind, expected", [(False, PLAIN), (True, REWOUND)])
def test_the_optimizer_uses_the_rewound_schedule(tmp_path, monkeypatch, rewind, expected):
    used = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    res = pipeline.run(cfg(tmp_path / "run", rewind), progress=False)
    assert res["prune_steps"] == [3]
    assert used == pytest.approx([1e-3 * f for f in expected], rel=1e-9)

