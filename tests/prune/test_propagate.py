"""``prune.propagate``: what the next block's calibration inputs are at a prune step. Oracle: the
statistics of ordinary full forwards of the model as it was before the step (no pruning in between),
which ``unpruned`` must reproduce for every block and ``pruned`` must not, past block 0."""
import pytest
import torch

from xpert_dist.config import LoraSettings, PruneConfig, RunConfig, validate
from xpert_dist.errors import ConfigError
from xpert_dist.models.lora import wrap_lora
from xpert_dist.stats.sequential import full_forward_stats

from helpers import Recording, tiny_model


def setup(propagate):
    model = wrap_lora(tiny_model(), LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg = PruneConfig(method="foresight", sparsity=0.5, pbs="off", reconstruct="obs", group="output",
                      propagate=propagate, ema_eta=1.0)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))
    return model, Recording(cfg, batch_size=4, progress=False), ids


def matches_full_forward(seen, oracle) -> list[bool]:
    """Per block: do the statistics it was pruned with equal the full-forward ones?"""
    return [all(torch.allclose(seen[i][g], oracle[i][g].sum, rtol=1e-5, atol=1e-5) for g in seen[i])
            for i in sorted(seen)]


@pytest.mark.parametrize("propagate", ["pruned", "unpruned", "pruned_first"])
def test_calibration_inputs_follow_the_setting(propagate):
    model, pruner, ids = setup(propagate)
    expected = {"pruned": ([True, False], [True, False]), "unpruned": ([True, True], [True, True]),
                # the first step finds no mask: propagates pruned outputs; the second finds one: unpruned
                "pruned_first": ([True, False], [True, True])}[propagate]
    for step in range(2):
        oracle = full_forward_stats(model, ids, mode="full", batch_size=4)
        pruner.step(model, ids, 0.5)
        got = matches_full_forward(pruner.seen[-1], oracle)
        assert got == expected[step], (propagate, step, got)
        with torch.no_grad():  # stand-in for training between the steps: the adapter moves
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))


def test_pruned_first_after_a_resume_uses_the_restored_masks():
    model, pruner, ids = setup("pruned_first")
    pruner.step(model, ids, 0.5)
    resumed = Recording(pruner.cfg, batch_size=4, progress=False)
    resumed.load_state_dict(pruner.state_dict())
    assert not resumed.propagates_pruned() and pruner.propagates_pruned() is False
    assert Recording(pruner.cfg, batch_size=4, progress=False).propagates_pruned()


def test_bad_value_is_refused():
    cfg = RunConfig()
    cfg.prune.propagate = "sideways"
    with pytest.raises(ConfigError, match="prune.propagate"):
        validate(cfg)
