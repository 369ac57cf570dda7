"""One-shot pruning of whole (tiny) models: exact sparsity, LoRA-wrapped models, and oracles for
what a prune step must leave behind."""
import copy

import pytest
import torch

from xpert_dist.config import LoraSettings
from xpert_dist.errors import ConfigError, ModelStructureError, StatisticsError
from xpert_dist.models import structure as st
from xpert_dist.models.lora import wrap_lora
from xpert_dist.prune.oneshot import prune
from xpert_dist.prune.pruner import mask_sha256
from xpert_dist.stats.sequential import sequential_calibration

from helpers import tiny_model

METHODS = ["magnitude", "wanda", "sparsegpt", "foresight"]


def linears(model):
    for i, b in enumerate(st.blocks(model)):
        for n, m in st.block_linears(b).items():
            yield f"{i}.{n}", st.base_linear(m).weight


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_hits_exact_sparsity(method, pattern, calib_ids):
    """Exact counts, and the weights are zero exactly where the mask prunes: the zero pattern of every
    matrix hashes to the pruner's recorded mask (kept entries non-zero, pruned entries zero)."""
    model = tiny_model()
    s = 0.5 if pattern == "2:4" else 0.37
    rep = prune(model, method, s, calib_ids, pattern=pattern, progress=False)
    assert len(rep.sparsity) == 14 == len(rep.mask_sha256)
    weights = {n: st.base_linear(m).weight for n, m in model.named_modules() if n in rep.mask_sha256}
    assert weights.keys() == rep.mask_sha256.keys()
    for name, W in weights.items():
        kept = W != 0
        assert mask_sha256(kept) == rep.mask_sha256[name], f"{name}: zeros are not the mask's pruned set"
        if pattern == "2:4":
            groups = kept.view(W.shape[0], -1, 4).sum(-1)
            assert torch.equal(groups, torch.full_like(groups, 2)), name  # exactly 2 of every 4 kept
        else:
            assert int((~kept).sum()) == round(s * W.numel()), name
    assert all(abs(v - s) < 0.01 for v in rep.sparsity.values())


def test_lora_model_scores_effective_weights(calib_ids):
    """Pruning a LoRA-wrapped model == pruning the merged plain model (same masks, same function)."""
    base = tiny_model()
    wrapped = wrap_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for n, p in wrapped.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # a trained-looking adapter
    merged = copy.deepcopy(wrapped).merge_and_unload()
    rep_w = prune(wrapped, "wanda", 0.5, calib_ids, progress=False)
    rep_m = prune(merged, "wanda", 0.5, calib_ids, progress=False)
    assert rep_w.mask_sha256 == rep_m.mask_sha256
    with torch.no_grad():
        a = wrapped(input_ids=calib_ids[:2]).logits
        b = merged(input_ids=calib_ids[:2]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for n, p in wrapped.named_parameters():  # adapter reset: the base holds everything
        if "lora_B" in n:
            assert float(p.abs().max()) == 0.0


def test_pbs_reduces_block_output_error_on_lora_model(calib_ids):
    """With PBS the pruned LoRA model's q_proj output error (vs dense) is below the no-PBS one."""
    torch.manual_seed(0)
    model = wrap_lora(tiny_model(), LoraSettings(r=8, alpha=16, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    dense = copy.deepcopy(model)
    errors = {}
    for form in ("off", "diagonal", "full"):
        m = copy.deepcopy(model)
        prune(m, "foresight", 0.5, calib_ids, pbs=form, progress=False)
        captured = {}

        def grab(key):
            def hook(_m, args, out):
                captured[key] = (args[0].detach(), out.detach())
            return hook
        q_pruned = st.block_linears(st.blocks(m)[0])["q_proj"]
        q_dense = st.block_linears(st.blocks(dense)[0])["q_proj"]
        h1 = q_pruned.register_forward_hook(grab("p"))
        with torch.no_grad():
            m(input_ids=calib_ids)
        h1.remove()
        x = captured["p"][0]
        with torch.no_grad():
            ref = q_dense(x)  # the dense layer on the same inputs
        errors[form] = float((captured["p"][1] - ref).pow(2).sum())
    assert errors["diagonal"] < errors["off"]
    assert errors["full"] < errors["off"]


def test_sequential_stats_equal_full_forward(calib_ids):
    from xpert_dist.stats.sequential import full_forward_stats

    model = tiny_model()
    ref = full_forward_stats(model, calib_ids, mode="full", dtype=torch.float64, batch_size=3)
    got = {}
    sequential_calibration(model, calib_ids, lambda i, b, s: got.__setitem__(i, s), mode="full",
                           dtype=torch.float64, batch_size=3, progress=False)
    assert ref.keys() == got.keys()
    for i in ref:
        for g in ref[i]:
            torch.testing.assert_close(got[i][g].sum, ref[i][g].sum, rtol=1e-12, atol=1e-10)
            assert got[i][g].n == ref[i][g].n == calib_ids.numel()


def test_owl_allocation_keeps_mean_sparsity(calib_ids):
    model = tiny_model(num_hidden_layers=3)
    rep = prune(model, "wanda", 0.5, calib_ids, allocation="owl", owl_lambda=0.1, progress=False)
    per_layer = {}
    for name, s in rep.sparsity.items():
        per_layer.setdefault(name.split(".")[2], []).append(s)
    means = [sum(v) / len(v) for v in per_layer.values()]
    assert abs(sum(means) / len(means) - 0.5) < 1e-3
    assert max(means) - min(means) > 1e-3  # actually non-uniform


def test_bad_input_is_named(calib_ids):
    model = tiny_model()
    with pytest.raises(ConfigError, match="sparsity"):
        prune(model, "wanda", 1.0, calib_ids)
    with pytest.raises(ConfigError, match="method"):
        prune(model, "obs", 0.5, calib_ids)
    with pytest.raises(ConfigError, match="group"):
        prune(model, "wanda", 0.5, calib_ids, group="row")
    with pytest.raises(ConfigError, match="calibration"):
        prune(model, "wanda", 0.5, None)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelStructureError, match="gpt2"):
        prune(gpt2, "wanda", 0.5, calib_ids)


def test_nan_statistics_are_refused(calib_ids):
    model = tiny_model()
    with torch.no_grad():
        st.blocks(model)[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(StatisticsError, match=r"non-finite values \(1 NaN, 0 inf\)"):
        prune(model, "wanda", 0.5, calib_ids, progress=False)
