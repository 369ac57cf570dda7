"""When the final mask is chosen (prune.mask_final), hand-computed cases."""
import pytest

from xpert_dist.config import PruneConfig
from xpert_dist.train.schedule import plan_prune_steps


@pytest.mark.parametrize("options, steps, final_at", [
    ({"schedule": "steps", "prune_every": 50, "mask_final": "last_inloop"}, (50, 100), 100),
    ({"schedule": "steps", "prune_every": 50, "mask_final": "end"}, (50, 100), None),
    ({"schedule": "steps", "prune_every": 50, "mask_final": "fraction:0.4"}, (50, 60), 60),
    ({"schedule": "steps", "prune_every": 20, "mask_final": "fraction:0.5"}, (20, 40, 60, 75), 75),
    ({"schedule": "before_training", "mask_final": "last_inloop"}, (), 0),
    ({"schedule": "before_training", "mask_final": "end"}, (), None),
    ({"schedule": "final_only", "mask_final": "last_inloop"}, (), None),
    ({"schedule": "epoch", "mask_final": "last_inloop"}, (), None),  # one epoch: no in-loop step
])
def test_plan(options, steps, final_at):
    plan = plan_prune_steps(PruneConfig(**options), steps_per_epoch=1000, total_steps=150)
    assert plan.steps == steps and plan.mask_final_at == final_at
    assert all(s == 0.4 for s in plan.sparsities)


def test_ramp_reaches_the_target_at_the_final_mask():
    plan = plan_prune_steps(PruneConfig(schedule="steps", prune_every=50, ramp="cubic", sparsity=0.5),
                            steps_per_epoch=1000, total_steps=150)
    assert plan.sparsities[-1] == 0.5 and plan.sparsities[0] < 0.5


def test_frozen_before():
    plan = plan_prune_steps(PruneConfig(schedule="steps", prune_every=50), 1000, 150)
    assert [plan.frozen_before(s) for s in (0, 100, 101, 149)] == [False, False, True, True]
    before = plan_prune_steps(PruneConfig(schedule="before_training"), 1000, 150)
    assert before.frozen_before(0)
