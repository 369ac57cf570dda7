"""When the final mask is chosen (prune.mask_final), hand-computed cases."""
import pytest

from xpert_dist.config import PruneConfig
from xpert_dist.train.schedule import plan_prune_steps


@pytest.mark.parametrize("options, steps, final_at", [
    ({"schedule": "steps", "prune_every": 50, "mask_final": "last_inloop"}, (50, 100), 100),
    ({"schedule": "steps", "prune_every": 50, "mask_final": "end"}, (50, 100), None),
    ({"schedule": "steps", "prune_every": 50, "mask_final": "fraction:0.4"}, (50, 60), 60),
    ({"schedule": "steps", "prune_every": 20, "mask_final": "fraction:0.5"}, (20, 40, 60, 75), 75),
    # prune.prune_steps: n steps at round(k * S / n), S = round(0.667 * 150) = 100; it overrides prune_every
    ({"schedule": "steps", "prune_steps": 4, "prune_every": 50, "mask_final": "fraction:0.667"}, (25, 50, 75, 100), 100),
    # without a fraction: round(k * 150 / 3) = 50, 100 (what prune_every=50 gives)
    ({"schedule": "steps", "prune_steps": 2, "mask_final": "last_inloop"}, (50, 100), 100),
    ({"schedule": "steps", "prune_steps": 5, "mask_final": "end"}, (25, 50, 75, 100, 125), None),
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


def test_prune_steps_keep_their_shape_at_another_length():
    """The shipped schedule at `make run`'s 40 steps: S = round(0.667 * 40) = 27, steps round(6.75) = 7,
    round(13.5) = 14, round(20.25) = 20 and 27; the cubic ramp 0.4 * (1 - (1 - k/4)^3)."""
    cfg = PruneConfig(schedule="steps", prune_steps=4, ramp="cubic", mask_final="fraction:0.667", sparsity=0.4)
    plan = plan_prune_steps(cfg, steps_per_epoch=1000, total_steps=40)
    assert plan.steps == (7, 14, 20, 27) and plan.mask_final_at == 27
    assert plan.sparsities == pytest.approx((0.4 * 37 / 64, 0.4 * 56 / 64, 0.4 * 63 / 64, 0.4))


def test_prune_steps_in_a_run_too_short_for_them():
    """10 steps asked in a 5-step run: round(k * 5 / 11) for k = 1..10 is 0, 1, 1, 2, 2, 3, 3, 4, 4, 5; only
    1..4 are inside the run, each once."""
    plan = plan_prune_steps(PruneConfig(schedule="steps", prune_steps=10), steps_per_epoch=1000, total_steps=5)
    assert plan.steps == (1, 2, 3, 4) and plan.mask_final_at == 4
