"""Rank function for tests/distributed/test_tree_reduce.py (importable by spawned children)."""
from __future__ import annotations


def leaf(g: int, n: int = 1000):
    import torch

    gen = torch.Generator().manual_seed(1000 + g)
    return (torch.randn(n, generator=gen) * 10 ** torch.randint(-3, 4, (n,), generator=gen)).float()


def tree_all_reduce_worker(rank, world, n_leaves):
    import torch.distributed as dist

    from xpert_dist.distributed.comm import init_distributed
    from xpert_dist.distributed.tree_reduce import tree_all_reduce
    from xpert_dist.stats.tree import TreeSum, contiguous_shard

    init_distributed(backend="gloo", timeout_s=60)
    ranges = [(s.start, s.stop) for s in (contiguous_shard(n_leaves, world, r) for r in range(world))]
    local = TreeSum(inplace=True)
    for g in range(*ranges[rank]):
        local.push(g, leaf(g))
    out = tree_all_reduce(local, ranges, 1000, leaf(0).dtype)
    dist.destroy_process_group()
    return out.numpy().tobytes()
