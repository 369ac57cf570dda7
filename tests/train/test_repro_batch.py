"""Global batch semantics: ``train.batch_size`` is the rows of one optimizer step over all ranks; the
per-rank share, the micro-batches and the accumulation follow from the world size, or the run is
refused with a ConfigError (exit 2) that names the problem."""
import json
import subprocess
import sys

import pytest
import torch

from xpert_dist.config import TrainConfig, config_from_dict
from xpert_dist.errors import ConfigError
from xpert_dist.train.data import TrainData, batch_split, calibration_batch, epoch_order, micro_batches

from helpers import REPO


def _data(n=24, L=6):
    ids = torch.arange(n * L).reshape(n, L)
    labels = ids.clone()
    labels[::3, :2] = -100  # rows with fewer loss tokens (prompt/completion-like)
    return TrainData(ids, labels, torch.ones_like(ids), ids[:2], "x")


@pytest.mark.parametrize("reproducible", [False, True])
@pytest.mark.parametrize("micro", [None, 1, 2])
def test_every_world_size_reads_the_same_rows_per_step(micro, reproducible):
    cfg = config_from_dict({"train": {"batch_size": 8, "micro_batch_size": micro, "reproducible": reproducible}})
    data = _data()
    order = epoch_order(len(data), 0, seed=3)
    for step in range(3):
        want = order[step * 8:(step + 1) * 8]  # hand-computed: the step's slice of the epoch order
        for world in (1, 2, 4):
            rows, leaves, n_items = [], [], set()
            for rank in range(world):
                sb = micro_batches(data, order, step, cfg, rank, world)
                split = batch_split(cfg.train, world)
                assert len(sb) == split.accum and split.accum * split.micro * world == 8
                for mb in sb:
                    assert mb["input_ids"].shape[0] == split.micro
                    rows += [int(r) // 6 for r in mb["input_ids"][:, 0]]  # ids encode the row
                leaves += sb.leaves
                n_items.add(sb.num_items)
            assert rows == want.tolist(), (world, step)
            assert leaves == list(range(8 // split.micro))
            # the loss denominator: loss tokens of the whole global batch, the same on every rank
            assert n_items == {int((data.labels[want][:, 1:] != -100).sum())}


def test_split_sizes_and_refusals():
    s = batch_split(TrainConfig(batch_size=8), 2)
    assert (s.per_rank, s.micro, s.accum) == (4, 4, 1)
    s = batch_split(TrainConfig(batch_size=8, micro_batch_size=1), 2)
    assert (s.per_rank, s.micro, s.accum) == (4, 1, 4)
    s = batch_split(TrainConfig(batch_size=8, reproducible=True), 4)
    assert (s.micro, s.accum, s.n_leaves) == (1, 2, 8)  # leaves of one row by default
    with pytest.raises(ConfigError, match="train.batch_size=6 is the global batch.*3 ranks|cannot be split evenly over 4"):
        batch_split(TrainConfig(batch_size=6), 4)
    with pytest.raises(ConfigError, match="micro_batch_size=4 does not divide the 2 rows per rank"):
        batch_split(TrainConfig(batch_size=8, micro_batch_size=4), 4)
    assert calibration_batch(TrainConfig(batch_size=8)) == 8  # independent of the world size
    assert calibration_batch(TrainConfig(batch_size=8, micro_batch_size=2)) == 2
    assert calibration_batch(TrainConfig(batch_size=8, reproducible=True)) == 1


def test_ds_config_written_from_the_global_batch(tmp_path):
    from xpert_dist.train.engine import load_ds_config

    ds = tmp_path / "z.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    cfg = config_from_dict({"ds_config": str(ds), "train": {"batch_size": 16, "micro_batch_size": 2}})
    got = load_ds_config(cfg, 4)
    assert (got["train_batch_size"], got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"]) == (16, 2, 2)
    ds.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(ConfigError, match="train_batch_size=32 contradicts"):
        load_ds_config(cfg, 4)


def test_bad_batch_settings_exit_2(tmp_path):
    for override, needle in (("train.micro_batch_size=3", "micro_batch_size=3 does not divide train.batch_size=4"),
                             ("train.reproducible=true", "train.reproducible=true needs plain torch"),
                             ("train.grad_accum=2", "unknown config key(s) train.grad_accum")):
        extra = [f"ds_config={REPO / 'ds_configs' / 'zero3.json'}"] if "reproducible" in override else []
        proc = subprocess.run([sys.executable, str(REPO / "launchers" / "run.py"), "model.tiny={}", override,
                               f"output_dir={tmp_path / 'out'}", *extra], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert needle in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
