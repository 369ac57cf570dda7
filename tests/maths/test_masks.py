"""Mask selection: exact counts, per-group optimality against sort oracles, ties, N:M, OWL."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.masks import (
    nm_mask,
    owl_outlier_ratio,
    owl_sparsities,
    parse_pattern,
    prune_count,
    select_mask,
    sparsity_of,
)


def _groups(t: torch.Tensor, group: str) -> torch.Tensor:
    return {"output": t, "input": t.t(), "layer": t.reshape(1, -1)}[group]


def _check_mask(scores: torch.Tensor, keep: torch.Tensor, sparsity: float, group: str) -> None:
    """Independent oracle: count, per-group balance, lowest-first within groups, fair extras."""
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    n_pruned = int((~keep).sum())
    assert n_pruned == round(sparsity * scores.numel())
    S, K = _groups(scores, group).tolist(), _groups(keep, group).tolist()
    counts = [row.count(False) for row in K]
    assert max(counts) - min(counts) <= 1
    g = len(S[0])
    assert set(counts) <= {math.floor(sparsity * g + 1e-9), math.floor(sparsity * g + 1e-9) + 1}
    for vals, ks, cnt in zip(S, K, counts):
        order = sorted(range(g), key=lambda i: (vals[i], i))  # (score, index) order
        assert {i for i in range(g) if not ks[i]} == set(order[:cnt])
    lo = min(counts)
    if max(counts) > lo:  # every +1 group's next candidate (at rank lo) <= every other group's
        extra = [gi for gi, c in enumerate(counts) if c > lo]
        rest = [gi for gi, c in enumerate(counts) if c == lo]
        cand = {gi: sorted(((v, i) for i, v in enumerate(S[gi])))[lo][0] for gi in range(len(S))}
        worst_extra = max((cand[gi], gi) for gi in extra)
        best_rest = min((cand[gi], gi) for gi in rest)
        assert worst_extra < best_rest


@pytest.mark.parametrize("group", ["output", "input", "layer"])
@pytest.mark.parametrize("shape", [(7, 13), (1, 9), (11, 3), (5, 5)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.29, 0.9, 0.999])
def test_select_mask_exact_and_optimal(group, shape, sparsity):
    g = torch.Generator().manual_seed(zlib.crc32(repr((group, shape, sparsity)).encode()))
    scores = torch.randn(*shape, dtype=torch.float64, generator=g).abs()
    keep = select_mask(scores, sparsity, group)
    _check_mask(scores, keep, sparsity, group)
    assert math.isclose(sparsity_of(keep), round(sparsity * scores.numel()) / scores.numel())


@pytest.mark.parametrize("group", ["output", "input", "layer"])
def test_select_mask_ties_deterministic(group):
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (9, 14), generator=g).to(torch.float32)  # many ties
    a = select_mask(scores, 0.43, group)
    b = select_mask(scores.clone(), 0.43, group)
    assert torch.equal(a, b)
    _check_mask(scores, a, 0.43, group)
    flat = torch.ones(4, 6)
    keep = select_mask(flat, 0.5, "layer")  # all tied: the first 12 row-major entries go
    assert torch.equal(keep.reshape(-1), torch.arange(24) >= 12)
    keep = select_mask(torch.ones(3, 5), 0.5, "output")  # 7 or 8 pruned -> 8 = 2*3 + 2 extras
    assert keep.logical_not().sum(1).tolist() == [3, 3, 2]  # extras to the lowest group indices
    assert torch.equal(keep[:, :2], torch.zeros(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("group", ["output", "input", "layer"])
@pytest.mark.parametrize("sparsity", [0.02, 0.25, 0.4, 0.5, 0.61, 0.97])
def test_select_mask_many_ties_against_the_sort_oracle(group, sparsity):
    """The partial selection + threshold gives the (score, index)-sorted choice when most scores tie
    with the threshold itself (4 distinct values, signed zeros among them)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((group, sparsity)).encode()))
    scores = torch.randint(-1, 3, (23, 37), generator=g).to(torch.float32)
    scores[scores == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (int((scores == 0).sum()),), generator=g)]
    _check_mask(scores, select_mask(scores, sparsity, group), sparsity, group)


def test_prune_count_rounding():
    assert prune_count(0.5, 5) == 2  # Python round: half to even
    assert prune_count(0.5, 7) == 4
    assert prune_count(0.29, 100) == 29
    assert prune_count(0.0, 10) == 0


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.randn(6, 4 * m, dtype=torch.float64, generator=g)
    keep = nm_mask(scores, n, m)
    blocks_k = keep.reshape(6, 4, m)
    assert torch.all(blocks_k.sum(-1) == n)
    for r in range(6):
        for b in range(4):
            vals = scores[r, b * m:(b + 1) * m].tolist()
            top = sorted(range(m), key=lambda i: (vals[i], i))[m - n:]
            assert {i for i in range(m) if blocks_k[r, b, i]} == set(top)
    assert sparsity_of(keep) == 1 - n / m
    ties = nm_mask(torch.zeros(2, m), n, m)  # ties: lower index pruned first
    assert torch.equal(ties, (torch.arange(m) >= m - n).expand(2, m))


def test_errors():
    s = torch.rand(4, 8)
    for bad in (1.0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ConfigError, match="sparsity"):
            select_mask(s, bad)
    with pytest.raises(ConfigError, match="group"):
        select_mask(s, 0.5, group="row")
    nan = s.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(StatisticsError, match="scores"):
        select_mask(nan, 0.5)
    with pytest.raises(StatisticsError, match="scores"):
        nm_mask(nan, 2, 4)
    with pytest.raises(ConfigError, match="divisible"):
        nm_mask(torch.rand(4, 6), 2, 4)
    for n, m in ((0, 4), (4, 4), (5, 4)):
        with pytest.raises(ConfigError, match="0 < n < m"):
            nm_mask(s, n, m)
    with pytest.raises(StatisticsError, match="bool"):
        sparsity_of(torch.ones(3))


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern(" Unstructured ") is None
    assert parse_pattern(None) is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern((2, 4)) == (2, 4)
    for bad in ("2-4", "4:2", "0:4", "a:b", "2:4:8", "", "structured", 24):
        with pytest.raises(ConfigError, match="pattern|N:M"):
            parse_pattern(bad)


def test_owl_outlier_ratio():
    t = torch.tensor([[1.0, 1.0, 1.0, 100.0], [1.0, 1.0, 1.0, 1.0]])
    mean = float(t.mean())
    want = sum(1 for v in t.reshape(-1).tolist() if v > 5 * mean) / t.numel()
    assert owl_outlier_ratio(t) == want == 1 / 8
    assert owl_outlier_ratio([t[0:1], t[1:2]]) == want  # pooled over the layer's matrices
    assert owl_outlier_ratio(t, m=100.0) == 0.0
    with pytest.raises(StatisticsError):
        owl_outlier_ratio(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("L,target", [(32, 0.5), (7, 0.6), (24, 0.55), (3, 0.3), (40, 0.7), (16, 0.03), (5, 0.97)])
def test_owl_sparsities(L, target):
    g = torch.Generator().manual_seed(L)
    ratios = torch.rand(L, dtype=torch.float64, generator=g) * 0.1
    lam = 0.08
    s = owl_sparsities(ratios, target, lam)
    assert s.dtype == torch.float64
    assert s.mean().item() == target
    assert bool((s >= target - lam).all() and (s <= target + lam).all())
    assert bool((s >= 0).all() and (s < 1).all())
    order = torch.argsort(ratios)  # more outliers -> pruned less (monotone non-increasing)
    assert bool((s[order][1:] <= s[order][:-1]).all())
    assert float((s - target).abs().max()) == pytest.approx(min(lam, target, 1 - target), rel=1e-6)


def test_owl_equal_ratios_and_errors():
    s = owl_sparsities(torch.full((6,), 0.02, dtype=torch.float64), 0.5)
    assert torch.equal(s, torch.full((6,), 0.5, dtype=torch.float64))
    with pytest.raises(ConfigError, match="sparsity"):
        owl_sparsities(torch.rand(4), 1.0)
    with pytest.raises(StatisticsError, match="ratios"):
        owl_sparsities(torch.tensor([0.1, float("nan")]), 0.5)
