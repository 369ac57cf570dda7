"""models/lora: where the masked adapter's mask lives. A base weight whose support is exactly the mask
stores nothing (the mask is read as W != 0); a kept weight that is exactly 0 keeps the bit-packed buffer.
Both give the float64 oracle (every masked linear merged to W + s·(BA)⊙M, adapters off) and the same
gradients as an adapter that stores every mask."""
import copy

import pytest
import torch

from xpert_dist.config import LoraSettings, PruneConfig
from xpert_dist.models import lora, structure as st
from xpert_dist.prune.pruner import Pruner

from helpers import tiny_model

IDS = torch.arange(20).reshape(2, 10) % 50 + 3


def _linears(model):
    for i, block in enumerate(st.blocks(model)):
        for n, m in st.block_linears(block, PruneConfig().modules).items():
            yield f"model.layers.{i}.{'self_attn' if n in st.ATTN else 'mlp'}.{n}", m


def _pruned_model(zero_kept: bool):
    """Tiny Llama (float64) with LoRA, every linear pruned to a random half, B non-zero; with
    ``zero_kept`` one kept weight of the first q_proj is exactly 0."""
    torch.manual_seed(0)
    model = lora.wrap_lora(tiny_model().double(), LoraSettings(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, m in _linears(model):
        w = m.base_layer.weight
        keep = torch.rand(w.shape, generator=g) > 0.5
        with torch.no_grad():
            w.mul_(keep)
            m.lora_B["default"].weight.normal_(generator=g)
        masks[name] = keep
    if zero_kept:
        name, m = next(_linears(model))
        r, c = masks[name].nonzero()[0].tolist()
        with torch.no_grad():
            m.base_layer.weight[r, c] = 0.0
    return model, masks


def _oracle_logits(model, masks):
    ref = copy.deepcopy(model)
    for name, m in _linears(ref):
        A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        with torch.no_grad():
            m.base_layer.weight.add_((B @ A) * masks[name] * m.scaling["default"])
            B.zero_()
    with torch.no_grad():
        return ref(input_ids=IDS).logits


def _logits_and_grads(model):
    logits = model(input_ids=IDS).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("zero_kept", [False, True], ids=["support", "kept_zero"])
def test_mask_from_support_matches_stored_mask_and_oracle(zero_kept):
    model, masks = _pruned_model(zero_kept)
    stored_all = copy.deepcopy(model)
    pruner = Pruner(PruneConfig())
    pruner.masks.update(masks)
    stored = pruner.freeze(model)
    buffers = [n for n, _ in model.named_buffers() if n.endswith(lora._BITS)]
    if zero_kept:  # only the module with a kept zero stores its mask
        assert stored == 1 and len(buffers) == 1 and "layers.0.self_attn.q_proj" in buffers[0]
    else:
        assert stored == 0 and buffers == []
    for name, m in _linears(model):
        assert torch.equal(lora.delta_mask(m), masks[name]), name
    for name, m in _linears(stored_all):
        lora.mask_delta(m, masks[name], implicit=False)
    logits, grads = _logits_and_grads(model)
    ref_logits, ref_grads = _logits_and_grads(stored_all)
    torch.testing.assert_close(logits, _oracle_logits(stored_all, masks), rtol=1e-10, atol=1e-10)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_support_is_mask_refuses_a_kept_zero_and_a_non_float_weight():
    lin = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., 0, 2, 0], [0, 3, 0, 4], [5, 0, 0, 6]]))
    keep = lin.weight != 0
    assert lora.support_is_mask(lin, keep)
    kept_zero = keep.clone()
    kept_zero[0, 1] = True  # kept, but the weight there is exactly 0
    assert not lora.support_is_mask(lin, kept_zero)
    lin.weight = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.uint8), requires_grad=False)
    assert not lora.support_is_mask(lin, torch.ones(3, 4, dtype=torch.bool))


def test_straight_through_on_the_fused_and_the_generic_path(monkeypatch):
    """prune.masked_grad=straight_through: the logits stay the oracle's (the model is exactly masked); the
    adapter's gradients are the same on the fused path (maths/masked_linear) and on the generic autograd path
    (``masked_delta_weight``, e.g. a quantized base), and differ from the exact masked gradients."""
    model, masks = _pruned_model(False)
    runs = {}
    for grad in ("exact", "straight_through"):
        m = copy.deepcopy(model)
        pruner = Pruner(PruneConfig(masked_grad=grad))
        pruner.masks.update(masks)
        pruner.freeze(m)
        runs[grad] = (m, *_logits_and_grads(m))
    fused_model, logits, grads = runs["straight_through"]
    torch.testing.assert_close(logits, _oracle_logits(model, masks), rtol=1e-10, atol=1e-10)
    assert torch.equal(logits, runs["exact"][1])
    fused_model.zero_grad()
    monkeypatch.setattr(lora, "_fused_path", lambda *a: None)
    generic_logits, generic_grads = _logits_and_grads(fused_model)
    torch.testing.assert_close(generic_logits, logits, rtol=1e-10, atol=1e-10)
    adapter = [n for n in grads if "lora_" in n]
    assert adapter
    for n in adapter:
        torch.testing.assert_close(generic_grads[n], grads[n], rtol=1e-9, atol=1e-12, msg=n)
    assert max(float((grads[n] - runs["exact"][2][n]).abs().max()) for n in adapter) > 1e-6
