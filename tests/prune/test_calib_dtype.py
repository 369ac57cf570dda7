"""``prune.calib_dtype``: a prune step's calibration forwards under bf16 autocast. Oracle: ordinary full
forwards of the model before the step, run by the test under its own ``torch.autocast`` (and, apart, in
fp32), with ``propagate=unpruned`` so that every block's inputs are those of the full forward."""
import pytest
import torch

from xpert_dist.config import LoraSettings, PruneConfig, RunConfig, validate
from xpert_dist.errors import ConfigError
from xpert_dist.models.lora import wrap_lora
from xpert_dist.stats.sequential import full_forward_stats

from helpers import Recording, tiny_model


def _setup(calib_dtype):
    model = wrap_lora(tiny_model(), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a non-zero adapter, so the calibration forwards run through it too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    cfg = PruneConfig(method="foresight", sparsity=0.5, pbs="off", reconstruct="obs", group="output",
                      propagate="unpruned", ema_eta=1.0, calib_dtype=calib_dtype)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    return model, Recording(cfg, batch_size=4, progress=False), ids


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_bf16_calibration_sees_the_autocast_forward():
    model, pruner, ids = _setup("bfloat16")
    fp32 = full_forward_stats(model, ids, mode="full", batch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = full_forward_stats(model, ids, mode="full", batch_size=4)
    pruner.step(model, ids, 0.5)
    seen = pruner.seen[-1]
    for i in seen:
        for g in seen[i]:
            assert seen[i][g].dtype == torch.float32  # XᵀX keeps prune.stats_dtype
            assert torch.allclose(seen[i][g], bf16[i][g].sum, rtol=1e-5, atol=1e-5), (i, g)
    # past block 0's first inputs (the embedding, no matmul) the bf16 forward really differs from fp32, a little
    later = [_rel(seen[i][g], fp32[i][g].sum) for i in seen for g in seen[i] if (i, g) != (0, "attn_in")]
    assert max(later) > 1e-4 and max(later) < 5e-2, later
    assert torch.equal(seen[0]["attn_in"], fp32[0]["attn_in"].sum)


def test_auto_is_the_model_dtype():
    model, pruner, ids = _setup("auto")
    fp32 = full_forward_stats(model, ids, mode="full", batch_size=4)
    pruner.step(model, ids, 0.5)
    for i, st in pruner.seen[-1].items():
        for g in st:
            assert torch.allclose(st[g], fp32[i][g].sum, rtol=1e-5, atol=1e-5), (i, g)


def test_bf16_calibration_keeps_the_mask_and_the_export_fp32():
    """Same sparsity, fp32 weights, and (tiny random model) nearly the same mask as fp32 calibration."""
    masks = {}
    for d in ("auto", "bfloat16"):
        model, pruner, ids = _setup(d)
        pruner.step(model, ids, 0.5)
        masks[d] = pruner.masks
        assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, keep in masks["bfloat16"].items():
        assert keep.float().mean().item() == pytest.approx(0.5, abs=0.02)
        agree = (keep == masks["auto"][name]).float().mean().item()
        assert agree > 0.99, (name, agree)


def test_bad_value_is_refused():
    cfg = RunConfig()
    cfg.prune.calib_dtype = "float8"
    with pytest.raises(ConfigError, match="prune.calib_dtype"):
        validate(cfg)
