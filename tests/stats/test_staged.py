"""Staged calibration (``sequential_calibration(staged=True)``, ``prune.propagate=true_sequential``): each input
group's statistics come from a forward in which the block's earlier groups (and every earlier block) are already
pruned, and every linear runs once per batch. Oracle: whole forwards of the full model (``full_forward_stats``)
on a copy to which the masks chosen so far have been applied by hand, group by group."""
import copy

import pytest
import torch

from xpert_dist.config import LLAMA_LINEARS, PruneConfig, RunConfig, validate
from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths import masks as mask_ops, scores as score_ops
from xpert_dist.models import structure as st
from xpert_dist.prune.oneshot import prune
from xpert_dist.stats import sequential

from helpers import lora_model

IDS = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
GROUPS = [g for g, _names in sequential.STAGES]


def _random_pruning(seed=0):
    """An ``on_block`` that records each group's XᵀX and zeroes a random half of the group's base weights
    (and the adapters' B, as a prune step without PBS does), returning the masks it applied."""
    g = torch.Generator().manual_seed(seed)
    seen, applied = {}, {}

    def on_block(i, block, stats, names=None):
        assert names is not None, "staged calibration names the group it hands over"
        (group,) = stats.keys()
        seen[(i, group)] = stats[group].sum.clone()
        for n in names:
            m = st.block_linears(block, [n])[n]
            keep = torch.rand(st.base_linear(m).weight.shape, generator=g) > 0.5
            applied[(i, n)] = keep
            with torch.no_grad():
                st.base_linear(m).weight.mul_(keep)
                st.lora_parts(m)[1].zero_()
    return on_block, seen, applied


def _apply(model, applied, upto, merge=False):
    """Apply the recorded masks of every (block, module) before ``upto`` = (block, stage index): the base weight
    masked (``merge``: the effective weight ``W + s·BA`` masked, as a prune step writes it) and B zeroed."""
    with torch.no_grad():
        for (i, n), keep in applied.items():
            stage = next(k for k, (_g, names) in enumerate(sequential.STAGES) if n in names)
            if (i, stage) < upto:
                m = st.block_linears(st.blocks(model)[i], [n])[n]
                W = st.effective_weight(m) if merge else st.base_linear(m).weight
                st.base_linear(m).weight.copy_(W * keep)
                st.lora_parts(m)[1].zero_()


@pytest.mark.parametrize("shortcuts", [True, False])
def test_each_group_is_calibrated_on_the_groups_pruned_before_it(shortcuts):
    model = lora_model()
    original = copy.deepcopy(model)
    on_block, seen, applied = _random_pruning()
    sequential.sequential_calibration(model, IDS, on_block, mode="full", batch_size=4, progress=False,
                                      staged=True, shortcuts=shortcuts)
    n_blocks = len(st.blocks(model))
    assert sorted(seen) == sorted((i, g) for i in range(n_blocks) for g in GROUPS)
    for i in range(n_blocks):
        for s, group in enumerate(GROUPS):
            oracle_model = copy.deepcopy(original)
            _apply(oracle_model, applied, (i, s))
            ref = sequential.full_forward_stats(oracle_model, IDS, mode="full", batch_size=4)[i][group].sum
            torch.testing.assert_close(seen[(i, group)], ref, rtol=1e-6, atol=1e-6, msg=f"block {i} {group}")
    # the oracle discriminates: block 0's o_proj input with q/k/v unpruned is another statistic
    unpruned = sequential.full_forward_stats(original, IDS, mode="full", batch_size=4)[0]["o_in"].sum
    assert not torch.allclose(seen[(0, "o_in")], unpruned, rtol=1e-3, atol=1e-3)


def test_every_linear_runs_once_per_batch():
    model = lora_model()
    calls = {}
    handles = [st.base_linear(m).register_forward_hook(lambda *_a, k=(i, n): calls.__setitem__(k, calls.get(k, 0) + 1))
               for i, b in enumerate(st.blocks(model)) for n, m in st.block_linears(b).items()]
    on_block, _seen, _applied = _random_pruning()
    sequential.sequential_calibration(model, IDS, on_block, mode="full", batch_size=4, progress=False, staged=True)
    for h in handles:
        h.remove()
    last = len(st.blocks(model)) - 1
    n_batches = 2
    for i in range(last + 1):
        for n in LLAMA_LINEARS:  # the last block's down_proj output feeds no block: not run
            assert calls.get((i, n), 0) == (0 if (i, n) == (last, "down_proj") else n_batches), (i, n)


def test_staged_prune_step_masks_are_wanda_masks_of_the_oracle_statistics():
    """A whole prune step (Pruner, Wanda, 50% per output row) with ``propagate=true_sequential``: every module's
    mask is the Wanda mask of its effective weight and the statistics of the oracle model (the masks chosen
    before it applied by hand)."""
    model = lora_model()
    original = copy.deepcopy(model)
    prune(model, "wanda", 0.5, IDS, batch_size=4, progress=False, propagate="true_sequential", group="output")
    chosen = {}
    for i, b in enumerate(st.blocks(model)):
        for n, m in st.block_linears(b).items():
            chosen[(i, n)] = st.base_linear(m).weight != 0
    for (i, n), keep in chosen.items():
        stage = next(k for k, (_g, names) in enumerate(sequential.STAGES) if n in names)
        oracle_model = copy.deepcopy(original)
        _apply(oracle_model, chosen, (i, stage), merge=True)
        d = sequential.full_forward_stats(oracle_model, IDS, mode="diag", batch_size=4)[i][st.INPUT_GROUPS[n]].sum
        U = st.effective_weight(st.block_linears(st.blocks(original)[i], [n])[n])
        expect = mask_ops.select_mask(score_ops.wanda_scores(U, d), 0.5, group="output")
        assert torch.equal(keep, expect), (i, n)


def test_refusals():
    with pytest.raises(ConfigError, match="true_sequential"):
        validate(RunConfig(prune=PruneConfig(propagate="true_sequential", modules=["q_proj", "v_proj"])))
    with pytest.raises(StatisticsError, match="recompute"):
        sequential.sequential_calibration(lora_model(), IDS, lambda *a, **k: None, staged=True, recompute=False,
                                          progress=False)
