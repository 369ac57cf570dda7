"""``sequential_calibration``'s shortcuts (``shortcuts=True``, what every prune step uses): the statistics
forward stops once down_proj's input is recorded, and LoRA layers whose ``B`` is exactly zero run their base
layer alone. Oracle: the same prune steps with every forward run whole (``shortcuts=False``); the two must agree
bit for bit (statistics, masks, every parameter), and the shortcuts must actually skip work."""
import functools

import pytest
import torch

from xpert_dist.config import LoraSettings, PruneConfig
from xpert_dist.models import structure as st
from xpert_dist.models.lora import bypass_zero_deltas, wrap_lora
from xpert_dist.prune import pruner as pruner_mod
from xpert_dist.stats import sequential

from helpers import Recording, lora_model, tiny_model


def _nudge_adapters(model, seed):
    """Stand-in for training between prune steps: every B moves (so the first forward's adapters are live)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _run(monkeypatch, shortcuts, cfg, steps=2):
    monkeypatch.setattr(pruner_mod, "sequential_calibration",
                        functools.partial(sequential.sequential_calibration, shortcuts=shortcuts))
    model = lora_model()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    pruner = Recording(cfg, batch_size=4, progress=False)
    for step in range(steps):
        pruner.step(model, ids, 0.5)
        _nudge_adapters(model, step)
    return model, pruner


@pytest.mark.parametrize("overrides", [
    dict(pbs="off", reconstruct="obs", propagate="pruned"),  # the shipped default's shape: B zeroed, recomputed
    dict(pbs="full", propagate="pruned"),  # B = ΔB after the step: nothing bypassed in the recompute
    dict(pbs="diagonal", propagate="unpruned"),  # no recompute: the statistics forward must run whole
])
def test_prune_steps_with_and_without_shortcuts_agree_bit_for_bit(monkeypatch, overrides):
    cfg = PruneConfig(method="foresight", sparsity=0.5, group="output", ema_eta=0.5, **overrides)
    fast_model, fast = _run(monkeypatch, True, cfg)
    ref_model, ref = _run(monkeypatch, False, cfg)
    assert len(fast.seen) == len(ref.seen) == 2
    for step_f, step_r in zip(fast.seen, ref.seen):
        for i in step_r:
            for g in step_r[i]:
                assert torch.equal(step_f[i][g], step_r[i][g]), (i, g)
    assert dict(fast.masks).keys() == dict(ref.masks).keys()
    for k in ref.masks.keys():
        assert torch.equal(fast.masks[k], ref.masks[k]), k
    fp, rp = dict(fast_model.named_parameters()), dict(ref_model.named_parameters())
    for n in rp:
        assert torch.equal(fp[n], rp[n]), n


def _count_down_proj_calls(model):
    calls = {"n": 0}
    handles = [st.base_linear(st.block_linears(b, ["down_proj"])["down_proj"]).register_forward_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1)) for b in st.blocks(model)]
    return calls, handles


@pytest.mark.parametrize("shortcuts", [True, False])
def test_statistics_forward_stops_before_down_proj(shortcuts):
    model = lora_model()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    calls, handles = _count_down_proj_calls(model)
    got = []
    sequential.sequential_calibration(model, ids, lambda i, b, s: got.append(sorted(s)), mode="full", batch_size=4,
                                      recompute=True, progress=False, shortcuts=shortcuts)
    for h in handles:
        h.remove()
    n_blocks, n_batches = len(st.blocks(model)), 2
    # with the shortcuts the recompute runs it in every block but the last (whose outputs feed no block) and the
    # statistics forward stops before it; without, both run it in every block
    expected = n_blocks - 1 if shortcuts else 2 * n_blocks
    assert calls["n"] == expected * n_batches
    assert all("down_in" in g for g in got)  # down_proj's input was still recorded


def test_only_layers_with_an_exactly_zero_delta_are_bypassed():
    model = wrap_lora(tiny_model(), LoraSettings(r=4, alpha=8, dropout=0.0)).eval()  # peft starts B at zero
    lin = st.block_linears(st.blocks(model)[0])
    x = torch.randn(2, 5, lin["q_proj"].in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lin["q_proj"].lora_B["default"].weight[0, 0] = 1e-30  # one tiny entry: the delta is not zero
        want = {n: lin[n](x) for n in ("q_proj", "k_proj")}
        with bypass_zero_deltas(lin.values()) as n:
            assert n == len(lin) - 1
            assert "forward" not in lin["q_proj"].__dict__ and "forward" in lin["k_proj"].__dict__
            got = {n: lin[n](x) for n in ("q_proj", "k_proj")}
    assert all("forward" not in m.__dict__ for m in lin.values())  # restored
    for n in got:
        assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("shortcuts,stats_fwd,recompute_fwd", [(True, 6, 0), (False, 7, 7)])
def test_adapters_zeroed_by_a_prune_step_are_skipped_in_the_recompute(monkeypatch, shortcuts, stats_fwd,
                                                                      recompute_fwd):
    """pbs=off: a prune step merges every adapter into the base and zeroes B, so the recomputed outputs
    need no adapter branch; the statistics forward still runs the live ones (all but down_proj's, stopped)."""
    monkeypatch.setattr(pruner_mod, "sequential_calibration",
                        functools.partial(sequential.sequential_calibration, shortcuts=shortcuts))
    model = lora_model()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    calls = {"n": 0}
    for m in model.modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            m.lora_A["default"].register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    cfg = PruneConfig(method="foresight", sparsity=0.5, group="output", pbs="off", reconstruct="obs",
                      propagate="pruned", ema_eta=1.0)
    Recording(cfg, batch_size=4, progress=False).step(model, ids, 0.5)
    n_blocks = len(st.blocks(model))  # adapter calls per block and batch (2 batches)
    assert calls["n"] == (stats_fwd + recompute_fwd) * n_blocks * 2
