"""Canonical tree summation: bit-identical sums for any contiguous partition (pure, no processes)."""
import itertools
import random

import pytest
import torch

from xpert_dist.errors import StatisticsError
from xpert_dist.stats.tree import (Node, TreeSum, canonical_sum, contiguous_shard, fold_nodes,
                                   max_partials, maximal_nodes)


def leaves(k, shape=(5, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # wildly different magnitudes make float addition visibly non-associative
    return [torch.randn(shape, generator=g, dtype=dtype) * 10.0 ** float(torch.randint(-6, 7, (1,), generator=g))
            for _ in range(k)]


def combine_partition(values, bounds):
    """Ranks own [bounds[i], bounds[i+1]); each streams its leaves; the owner folds all nodes in order."""
    owner = TreeSum(inplace=False)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        t = TreeSum(inplace=True)
        for g in range(a, b):
            t.push(g, values[g].clone())
        assert [(n.level, n.index) for n in t.nodes()] == maximal_nodes(a, b)
        owner.extend(t.nodes())
    return owner.total()


def shard_bounds(k, w):
    return [contiguous_shard(k, w, r).start for r in range(w)] + [k]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 13, 16, 33])
def test_world_sizes_1_2_4_bit_identical(k):
    vals = leaves(k, seed=k)
    ref = canonical_sum(vals)
    for w in (1, 2, 3, 4, 8):
        got = combine_partition(vals, shard_bounds(k, w))
        assert torch.equal(got, ref), (k, w)


def test_every_contiguous_partition_bit_identical():
    k = 11
    vals = leaves(k, seed=1)
    ref = canonical_sum(vals)
    for ncut in range(0, 5):
        for cuts in itertools.combinations(range(1, k), ncut):
            got = combine_partition(vals, [0, *cuts, k])
            assert torch.equal(got, ref), cuts


def test_random_partitions_float64_and_large_k():
    rng = random.Random(0)
    for trial in range(20):
        k = rng.randint(1, 200)
        vals = leaves(k, shape=(3,), seed=trial, dtype=torch.float64)
        ref = canonical_sum(vals)
        cuts = sorted(rng.sample(range(1, k), min(k - 1, rng.randint(0, 9)))) if k > 1 else []
        assert torch.equal(combine_partition(vals, [0, *cuts, k]), ref)


def test_tree_differs_from_sequential_sum_so_the_test_is_meaningful():
    vals = leaves(13, seed=3)
    seq = vals[0].clone()
    for v in vals[1:]:
        seq = seq + v
    assert not torch.equal(seq, canonical_sum(vals))


def test_maximal_nodes_cover_exactly():
    for a in range(0, 40):
        for b in range(a, 70):
            nodes = maximal_nodes(a, b)
            pos = a
            for level, index in nodes:
                assert index << level == pos
                pos = (index + 1) << level
            assert pos == b
            # maximal: no two neighbours are siblings
            for (l1, i1), (l2, i2) in zip(nodes, nodes[1:]):
                assert not (l1 == l2 and i1 % 2 == 0 and i2 == i1 + 1)


def test_partials_bounded_logarithmically():
    for a in range(0, 64):
        for n in range(1, 130):
            t = TreeSum()
            for g in range(a, a + n):
                t.push(g, torch.zeros(1))
            assert t.max_live <= max_partials(n), (a, n, t.max_live)


def test_non_contiguous_rejected():
    t = TreeSum()
    t.push(3, torch.zeros(2))
    with pytest.raises(StatisticsError, match="contiguous"):
        t.push(5, torch.zeros(2))
    with pytest.raises(StatisticsError, match="empty"):
        TreeSum().total()


def test_total_consume_same_bits():
    vals = leaves(13, seed=4)
    t1, t2 = TreeSum(inplace=False), TreeSum(inplace=True)
    for g, v in enumerate(vals):
        t1.push(g, v.clone())
        t2.push(g, v.clone())
    a = t1.total()
    b = t2.total(consume=True)
    assert torch.equal(a, b) and torch.equal(a, canonical_sum(vals)) and t2.empty


def test_fold_nodes_is_canonical_with_absent_leaves():
    vals = leaves(7, seed=5)
    nodes = [Node(2, 0, canonical_sum(vals[:4])), Node(1, 2, vals[4] + vals[5]), Node(0, 6, vals[6].clone())]
    assert torch.equal(fold_nodes(nodes), canonical_sum(vals))
