"""IoU, Spearman, movement and aggregation against hand-computed small cases (ties, empty masks)."""
import math

import pytest
import torch

from xpert_dist.analysis import metrics as M
from xpert_dist.errors import StatisticsError
from xpert_dist.prune.pruner import StepReport


def b(*bits):
    return torch.tensor(bits, dtype=torch.bool)


# ----------------------------------------------------------------------------- IoU

def test_iou_hand_cases():
    assert M.overlap_counts(b(1, 1, 0, 0), b(1, 0, 1, 0)) == (1, 3)
    assert M.iou(b(1, 1, 0, 0), b(1, 0, 1, 0)) == pytest.approx(1 / 3)
    assert M.iou(b(1, 1, 0, 1), b(1, 1, 0, 1)) == 1.0
    assert M.iou(b(1, 1, 0, 0), b(0, 0, 1, 1)) == 0.0
    # 2-D masks are compared entry by entry
    a = torch.tensor([[True, False], [True, True]])
    c = torch.tensor([[True, True], [False, True]])
    assert M.iou(a, c) == pytest.approx(2 / 4)


def test_iou_empty_masks():
    assert M.iou(b(0, 0, 0), b(0, 0, 0)) == 1.0  # two empty kept sets are identical
    assert M.iou(b(0, 0, 0), b(0, 1, 0)) == 0.0
    assert M.iou(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)) == 1.0


def test_iou_rejects_bad_input():
    with pytest.raises(StatisticsError, match="shapes"):
        M.iou(b(1, 0), b(1, 0, 1))
    with pytest.raises(StatisticsError, match="bool"):
        M.iou(torch.tensor([1, 0]), b(1, 0))


def test_changed_share_of_equal_size_kept_sets():
    a, c = b(1, 1, 1, 1, 0, 0), b(1, 1, 1, 0, 1, 0)  # 3 of 4 shared: IoU 3/5, 1 of 4 differs
    assert M.changed_share(M.iou(a, c)) == pytest.approx(M.moved_share(a, c)) == pytest.approx(0.25)


def test_random_iou_matches_simulation():
    assert M.random_iou(0.5) == pytest.approx(1 / 3)
    assert M.random_iou(0.4) == pytest.approx(0.6 / 1.4)
    assert M.random_iou(0.0) == 1.0
    g = torch.Generator().manual_seed(0)
    n = 200_000
    a = torch.rand(n, generator=g) < 0.6
    c = torch.rand(n, generator=g) < 0.6
    assert M.iou(a, c) == pytest.approx(M.random_iou(0.4), abs=5e-3)


# ----------------------------------------------------------------------------- ranks and Spearman

def test_average_ranks_with_ties():
    assert M.average_ranks(torch.tensor([10.0, 20.0, 20.0, 30.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert M.average_ranks(torch.tensor([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]
    assert M.average_ranks(torch.tensor([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]
    # ties spread over the order: [2, 1, 2, 1, 3] -> ones get (1+2)/2, twos (3+4)/2
    assert M.average_ranks(torch.tensor([2, 1, 2, 1, 3])).tolist() == [3.5, 1.5, 3.5, 1.5, 5.0]
    assert M.average_ranks(torch.tensor([[1.0, 2.0], [2.0, 0.0]])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_cases():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert M.spearman(x, x) == pytest.approx(1.0)
    assert M.spearman(x, -x) == pytest.approx(-1.0)
    assert M.spearman(x, torch.exp(3 * x)) == pytest.approx(1.0)  # monotone transform: same ranks
    # ties: ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert M.spearman(a, x) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    # a textbook case: d = rank differences, no ties -> 1 - 6 Σd² / (n(n²-1))
    p = torch.tensor([86.0, 97.0, 99.0, 100.0, 101.0, 103.0, 106.0, 110.0, 112.0, 113.0])
    q = torch.tensor([2.0, 20.0, 28.0, 27.0, 50.0, 29.0, 7.0, 17.0, 6.0, 12.0])
    assert M.spearman(p, q) == pytest.approx(-29 / 165)


def test_spearman_undefined_cases_are_nan():
    assert math.isnan(M.spearman(torch.ones(5), torch.arange(5.0)))
    assert math.isnan(M.spearman(torch.tensor([1.0]), torch.tensor([2.0])))
    with pytest.raises(StatisticsError):
        M.spearman(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    with pytest.raises(StatisticsError, match="shapes"):
        M.spearman(torch.ones(3), torch.ones(4))


def test_spearman_on_matrices_flattens():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert M.spearman(a, a.t().contiguous().t()) == pytest.approx(1.0)
    assert M.spearman(a, a.flip(0)) == pytest.approx(M.spearman(a.flatten(), a.flip(0).flatten()))


# ----------------------------------------------------------------------------- movement

def test_moved_share():
    assert M.moved_share(b(1, 1, 1, 0), b(1, 0, 1, 1)) == pytest.approx(1 / 3)
    assert M.moved_share(b(1, 1, 0, 0), b(1, 1, 0, 0)) == 0.0
    assert M.moved_share(b(1, 1, 0, 0), b(0, 0, 1, 1)) == 1.0
    assert M.moved_share(b(0, 0, 0), b(1, 1, 1)) == 0.0  # nothing was kept, nothing moved


def test_movement_from_reports_accepts_dicts_and_step_reports():
    reports = [StepReport(step=0, final=False, target_sparsity=0.5, seconds=1.0),
               StepReport(step=1, final=False, target_sparsity=0.5, seconds=1.0, moved={"model.layers.0.mlp.up_proj": 0.2}),
               {"step": 2, "final": True, "moved": {"model.layers.0.mlp.up_proj": 0.1}}]
    steps = M.movement_from_reports(reports)
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[1]["final"] and steps[0]["moved"] == {"model.layers.0.mlp.up_proj": 0.2}


# ----------------------------------------------------------------------------- aggregation

VALUES = {"model.layers.0.self_attn.q_proj": 0.2, "model.layers.0.mlp.up_proj": 0.4,
          "model.layers.1.self_attn.q_proj": 0.6, "model.layers.1.mlp.up_proj": float("nan"),
          "lm_head": 9.0}


def test_aggregate_per_layer_module_and_all():
    assert M.aggregate(VALUES, "layer") == {0: pytest.approx(0.3), 1: pytest.approx(0.6)}
    by_mod = M.aggregate(VALUES, "module")
    assert list(by_mod) == ["q_proj", "up_proj"]  # Llama order
    assert by_mod == {"q_proj": pytest.approx(0.4), "up_proj": pytest.approx(0.4)}
    assert M.aggregate(VALUES, "all") == {"all": pytest.approx(0.4)}
    w = {n: 1.0 for n in VALUES} | {"model.layers.0.mlp.up_proj": 3.0}
    assert M.aggregate(VALUES, "layer", weights=w)[0] == pytest.approx((0.2 + 3 * 0.4) / 4)
    with pytest.raises(StatisticsError):
        M.aggregate(VALUES, "block")


def test_pooled_iou_is_sum_of_intersections_over_sum_of_unions():
    counts = {"model.layers.0.self_attn.q_proj": (1, 3), "model.layers.0.self_attn.k_proj": (8, 10),
              "model.layers.1.self_attn.q_proj": (0, 0)}
    assert M.pooled_iou(counts, "layer") == {0: pytest.approx(9 / 13), 1: 1.0}
    assert M.pooled_iou(counts, "all")["all"] == pytest.approx(9 / 13)
    assert M.pooled_iou(counts, "module")["q_proj"] == pytest.approx(1 / 3)


def test_grid_layout():
    layers, modules, g = M.grid(VALUES)
    assert layers == [0, 1] and modules == ["q_proj", "up_proj"]
    assert g[0] == [0.2, 0.4] and g[1][0] == 0.6 and math.isnan(g[1][1])
