"""TensorBoard events of a tiny real run, read back with tensorboard's EventAccumulator, equal the
run's own records (results.json's loss history and prune reports). Needs the ``tensorboard``
package (in the ``[dev]`` extra, so CI has it): no skip when it is missing, the test fails."""
import json
import sys

import pytest

from xpert_dist.config import config_from_dict
from xpert_dist.train import pipeline, tracking
from xpert_dist.train.engine import lr_at

from helpers import SHARED_DATA


def tiny_cfg(out, **train):
    return config_from_dict({
        "name": "tb", "output_dir": str(out), "model": {"tiny": {}}, "lora": {"dropout": 0.0},
        "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 32,
                 "max_train_samples": 24, "calib_samples": 4},
        "train": {"max_steps": 5, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, **train},
        "prune": {"method": "wanda", "sparsity": 0.5, "schedule": "steps", "prune_every": 2},
        "eval": {"perplexity_windows": 1, "perplexity_seq_len": 32, "tasks": [], "base_reference": False}})


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_events_equal_the_run_records(tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    pipeline.run(cfg, progress=False)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    ev = scalars(tmp_path / "run" / "tensorboard")
    history = res["loss_history"]
    assert [s for s, _ in ev["train/loss"]] == [s for s, _ in history] == [1, 2, 3, 4, 5]
    assert [v for _, v in ev["train/loss"]] == pytest.approx([v for _, v in history], rel=1e-6)
    assert ev["train/lr"] == [(s, pytest.approx(lr_at(s - 1, cfg, 5), rel=1e-6)) for s in range(1, 6)]
    assert [s for s, _ in ev["train/tokens_per_s"]] == [1, 2, 3, 4, 5]
    assert all(v > 0 for _, v in ev["train/tokens_per_s"] + ev["memory/peak_rss_mb"])
    # prune steps before optimizer steps 2 and 4, then the final one at the last step (5)
    reports = res["prune_reports"]
    assert res["prune_steps"] == [2, 4] and len(reports) == 3 and reports[-1]["final"]
    assert [s for s, _ in ev["prune/seconds"]] == [2, 4, 5]
    assert [v for _, v in ev["prune/seconds"]] == pytest.approx([r["seconds"] for r in reports], rel=1e-6)
    assert [v for _, v in ev["prune/target_sparsity"]] == pytest.approx([r["target_sparsity"] for r in reports])
    assert [v for _, v in ev["prune/sparsity"]] == pytest.approx(
        [sum(r["sparsity"].values()) / len(r["sparsity"]) for r in reports], rel=1e-6)
    moved = [(i, sum(r["moved"].values()) / len(r["moved"])) for i, r in enumerate(reports) if r["moved"]]
    assert moved and [v for _, v in ev["prune/mask_moved"]] == pytest.approx([m for _, m in moved], rel=1e-6)
    assert [v for _, v in ev["prune/final"]] == [0.0, 0.0, 1.0]


def test_switched_off_or_not_installed_is_a_no_op(tmp_path, monkeypatch):
    off = tiny_cfg(tmp_path / "off", tensorboard=False)
    assert type(tracking.open_tracker(off, rank=0)) is tracking.NullTracker
    on = tiny_cfg(tmp_path / "on")
    assert type(tracking.open_tracker(on, rank=1)) is tracking.NullTracker  # only rank 0 writes
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert type(tracking.open_tracker(on, rank=0)) is tracking.NullTracker
    assert not (tmp_path / "off").exists() and not (tmp_path / "on").exists()
