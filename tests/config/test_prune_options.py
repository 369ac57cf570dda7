"""Validation of the issue-10 prune options: bad values and double compensation are refused."""
import pytest

from xpert_dist.config import config_from_dict, mask_final_fraction
from xpert_dist.errors import ConfigError


def cfg(**prune):
    return config_from_dict({"prune": prune})


@pytest.mark.parametrize("prune, match", [
    ({"mask_final": "sometimes"}, "prune.mask_final"),
    ({"mask_final": "fraction:1.5"}, "prune.mask_final"),
    ({"mask_final": "fraction:x"}, "prune.mask_final"),
    ({"pbs_order": "sideways"}, "prune.pbs_order"),
    ({"reconstruct": "sparsegpt"}, "prune.reconstruct"),
    ({"adapter_reset": "yes"}, "prune.adapter_reset"),
    ({"lr_rewind": "yes"}, "prune.lr_rewind"),
    ({"method": "sparsegpt", "schedule": "steps", "prune_every": 5, "pbs": "diagonal"}, "compensates twice"),
    ({"method": "sparsegpt", "schedule": "epoch", "pbs": "full"}, "compensates twice"),
    ({"method": "sparsegpt", "reconstruct": "obs", "pbs": "off"}, "second time"),
    ({"method": "foresight", "reconstruct": "obs", "pbs": "diagonal"}, "second time"),
    ({"adapter_reset": True, "pbs": "diagonal", "pbs_order": "adapter"}, "adapter_reset"),
    ({"allocation": "owl", "owl_lambda": -0.1}, "prune.owl_lambda"),
    ({"allocation": "owl", "owl_lambda": 1.0}, "prune.owl_lambda"),
    ({"allocation": "owl", "owl_m": 0}, "prune.owl_m"),
    ({"reconstruct": "obs", "pbs": "off", "hessian_carry": 1.5}, "prune.hessian_carry"),
    ({"reconstruct": "obs", "pbs": "off", "hessian_carry": -0.1}, "prune.hessian_carry"),
    ({"reconstruct": "obs", "pbs": "off", "hessian_carry": "all"}, "prune.hessian_carry"),
    ({"method": "foresight", "pbs": "diagonal", "hessian_carry": 1.0}, "prune.hessian_carry"),
    ({"masked_grad": "approximate"}, "prune.masked_grad="),
    ({"masked_grad": "straight_through", "masked_grad_dtype": "bfloat16"}, "does not compute"),
])
def test_refused(prune, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**prune)


@pytest.mark.parametrize("prune", [
    {"method": "sparsegpt", "schedule": "final_only", "pbs": "diagonal"},  # post-hoc: no in-loop PBS runs
    {"method": "sparsegpt", "schedule": "steps", "prune_every": 5, "pbs": "off"},
    {"method": "foresight", "reconstruct": "obs", "pbs": "off", "adapter_reset": True},
    {"pbs": "full", "pbs_order": "base", "adapter_reset": True, "mask_final": "fraction:0.25"},
    {"allocation": "owl", "owl_lambda": 0.0},
    {"allocation": "owl", "owl_lambda": 0.04, "owl_m": 7},
    {"reconstruct": "obs", "pbs": "off", "hessian_carry": 1.0},
    {"method": "sparsegpt", "schedule": "steps", "prune_every": 5, "pbs": "off", "hessian_carry": 0.5},
    {"method": "foresight", "pbs": "full", "hessian_carry": 0.5},
    {"method": "foresight", "pbs": "diagonal", "saliency": "obs", "hessian_carry": 0.5},  # the OBS saliency solves too
    {"masked_grad": "straight_through"},
    {"masked_grad": "exact", "masked_grad_dtype": "bfloat16"},
])
def test_accepted(prune):
    cfg(**prune)


def test_mask_final_fraction():
    assert mask_final_fraction("end") is None and mask_final_fraction("last_inloop") is None
    assert mask_final_fraction("fraction:0.3") == pytest.approx(0.3)


@pytest.mark.parametrize("sets", [0, -1, 2.5, "four"])
def test_calib_sets_refused(sets):
    with pytest.raises(ConfigError, match="data.calib_sets"):
        config_from_dict({"data": {"calib_sets": sets}})
