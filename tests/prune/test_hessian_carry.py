"""prune.hessian_carry with data.calib_sets: a prune step's OBS reconstruction solves with the XᵀX of its
own windows plus every earlier step's. Oracle: layer 0's inputs do not depend on any pruning, so the carried
statistic there must equal the XᵀX of both steps' windows computed by plain full forwards (float64), and the
step's weights must be what the pure obs_reconstruct gives with that matrix and the step's mask."""
import copy

import pytest
import torch

from xpert_dist.config import PruneConfig
from xpert_dist.maths.reconstruct import obs_reconstruct
from xpert_dist.prune.pruner import Pruner
from xpert_dist.stats.sequential import full_forward_stats

from helpers import tiny_model


def windows(seed, n=6, length=24):
    return torch.randint(0, 255, (n, length), generator=torch.Generator().manual_seed(seed))


def cfg(carry, offload="cpu"):
    return PruneConfig(method="foresight", sparsity=0.5, pbs="off", reconstruct="obs", group="output",
                       hessian_carry=carry, stats_dtype="float64", solver_dtype="float64", offload=offload)


def two_steps(carry, tmp_path, offload="cpu"):
    model = tiny_model()
    pruner = Pruner(cfg(carry, offload), batch_size=3, progress=False, work_dir=str(tmp_path))
    a, b = windows(1), windows(2)
    pruner.step(model, a, 0.3)
    after_first = copy.deepcopy(model)
    pruner.step(model, b, 0.5)
    return model, after_first, pruner, a, b


def q_weight(model):
    return model.model.layers[0].self_attn.q_proj.weight.detach()


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_carried_hessian_is_both_steps_windows(offload, tmp_path):
    model, after_first, pruner, a, b = two_steps(1.0, tmp_path, offload)
    ref = full_forward_stats(tiny_model(), torch.cat([a, b]), mode="full", dtype=torch.float64, batch_size=3)
    H = ref[0]["attn_in"].sum
    got = pruner.hessians.get_tensor("model.layers.0.attn_in", "cpu").double()
    torch.testing.assert_close(got, H, rtol=1e-5, atol=1e-6)
    keep = pruner.masks["model.layers.0.self_attn.q_proj"]
    want = obs_reconstruct(q_weight(after_first).double(), H, keep, dtype=torch.float64)
    torch.testing.assert_close(q_weight(model).double(), want, rtol=1e-4, atol=1e-5)
    # and not what this step's windows alone give: the carry reached the weights
    alone = obs_reconstruct(q_weight(after_first).double(), ref_b(b)[0]["attn_in"].sum, keep, dtype=torch.float64)
    assert (q_weight(model).double() - alone).abs().max() > 1e-3


def ref_b(b):
    return full_forward_stats(tiny_model(), b, mode="full", dtype=torch.float64, batch_size=3)


def test_no_carry_solves_with_this_steps_windows_only(tmp_path):
    model, after_first, pruner, _, b = two_steps(0.0, tmp_path)
    assert len(pruner.hessians) == 0
    keep = pruner.masks["model.layers.0.self_attn.q_proj"]
    want = obs_reconstruct(q_weight(after_first).double(), ref_b(b)[0]["attn_in"].sum, keep, dtype=torch.float64)
    torch.testing.assert_close(q_weight(model).double(), want, rtol=1e-4, atol=1e-5)


def test_carry_survives_a_checkpoint_round_trip(tmp_path):
    """A resumed run continues the carried sum: state_dict -> load_state_dict, then the same next step."""
    model = tiny_model()
    p1 = Pruner(cfg(0.5), batch_size=3, progress=False)
    p1.step(model, windows(1), 0.3)
    state = copy.deepcopy(p1.state_dict())
    twin = copy.deepcopy(model)
    p2 = Pruner(cfg(0.5), batch_size=3, progress=False)
    p2.load_state_dict(state)
    p1.step(model, windows(2), 0.5)
    p2.step(twin, windows(2), 0.5)
    assert sorted(p1.hessians.keys()) == sorted(p2.hessians.keys()) and len(p1.hessians) > 0
    for k in p1.hessians.keys():
        assert torch.equal(p1.hessians.get_tensor(k, "cpu"), p2.hessians.get_tensor(k, "cpu"))
    assert torch.equal(q_weight(model), q_weight(twin))


def test_dropping_smoothed_state_removes_carry_files(tmp_path):
    _, _, pruner, _, _ = two_steps(1.0, tmp_path, "disk")
    d = pruner.hessians.directory
    assert d is not None and d.exists() and any(d.iterdir())
    pruner.drop_smoothed_scores()
    assert len(pruner.hessians) == 0 and not d.exists()
