"""Where the pruner keeps its smoothed (EMA) scores between prune steps: the placement
(``prune.offload``) never changes a mask, and the state survives a checkpoint round trip."""
import pytest
import torch

from xpert_dist.config import LoraSettings, PruneConfig
from xpert_dist.errors import ConfigError
from xpert_dist.models.lora import wrap_lora
from xpert_dist.prune.pruner import Pruner

from helpers import tiny_model


def lora_model(seed=0):
    model = wrap_lora(tiny_model(), LoraSettings(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def retrain(model, seed):
    """Stand-in for the training between prune steps: a new adapter, so the second step's scores
    differ from the first and the smoothing matters."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def two_steps(offload, tmp_path, ema_dtype="float32"):
    cfg = PruneConfig(method="foresight", sparsity=0.4, pbs="diagonal", group="layer", offload=offload,
                      ema_dtype=ema_dtype)
    model = lora_model()
    pruner = Pruner(cfg, batch_size=4, progress=False, work_dir=str(tmp_path / offload))
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    reports = [pruner.step(model, ids, 0.4)]
    retrain(model, 7)
    reports.append(pruner.step(model, ids, 0.4))
    return pruner, reports


def test_placement_does_not_change_masks_or_scores(tmp_path):
    runs = {off: two_steps(off, tmp_path) for off in ("none", "cpu", "disk")}
    ref_pruner, ref_reports = runs["none"]
    assert len(ref_pruner.ema) == 14
    for off, (pruner, reports) in runs.items():
        assert [r.mask_sha256 for r in reports] == [r.mask_sha256 for r in ref_reports], off
        for k in ref_pruner.ema.keys():
            assert torch.equal(pruner.ema.get_tensor(k), ref_pruner.ema.get_tensor(k)), (off, k)
    disk_files = list((tmp_path / "disk" / "ema-rank0").glob("*.stats"))
    assert len(disk_files) == 14 and not list((tmp_path / "cpu").glob("**/*.stats"))
    runs["disk"][0].drop_smoothed_scores()  # after the final step: files and their directory go
    assert len(runs["disk"][0].ema) == 0 and not (tmp_path / "disk" / "ema-rank0").exists()


def test_smoothing_is_eta_weighted_mean_of_step_scores(tmp_path):
    """The stored EMA after two steps is 0.5·(step-1 scores) + 0.5·(step-2 scores), the step scores
    recomputed here without smoothing on identical model states. Checked on block 0: later blocks'
    statistics depend on how the blocks before them were pruned, which the smoothing changes."""
    smoothed, _ = two_steps("cpu", tmp_path)
    # eta just below 1: the stored value is (up to 1e-12) each step's own scores
    cfg = PruneConfig(method="foresight", sparsity=0.4, pbs="diagonal", group="layer", ema_eta=1.0 - 1e-12)
    model = lora_model()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    raw = Pruner(cfg, batch_size=4, progress=False)
    record, original = {}, raw.ema.put_tensor
    raw.ema.put_tensor = lambda k, t: (record.setdefault(k, []).append(t.clone()), original(k, t))
    raw.step(model, ids, 0.4)
    retrain(model, 7)
    raw.step(model, ids, 0.4)
    assert len(record) == 14
    block0 = {k: v for k, v in record.items() if k.startswith("model.layers.0.")}
    assert len(block0) == 7
    for k, (s1, s2) in block0.items():
        torch.testing.assert_close(smoothed.ema.get_tensor(k), 0.5 * s1 + 0.5 * s2, rtol=1e-5, atol=0)


def test_bfloat16_scores_and_checkpoint_round_trip(tmp_path):
    pruner, _ = two_steps("disk", tmp_path, ema_dtype="bfloat16")
    assert {pruner.ema.get_tensor(k).dtype for k in pruner.ema.keys()} == {torch.bfloat16}
    state = pruner.state_dict()
    fresh = Pruner(pruner.cfg, batch_size=4, progress=False, work_dir=str(tmp_path / "fresh"))
    fresh.load_state_dict(state)
    assert fresh.ema.keys() == pruner.ema.keys()
    assert all(torch.equal(fresh.ema.get_tensor(k), pruner.ema.get_tensor(k)) for k in pruner.ema.keys())
    assert dict(fresh.masks).keys() == dict(pruner.masks).keys()


def test_disk_without_a_directory_is_refused():
    with pytest.raises(ConfigError, match="prune.offload=disk needs prune.offload_dir"):
        Pruner(PruneConfig(offload="disk"), progress=False)
