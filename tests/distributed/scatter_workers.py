"""Rank function and shared case data for tests/distributed/test_scatter_reduce.py."""
from __future__ import annotations

# (name, kind, mode, shape, per-rank leaf ranges): "tree" partials are the rank's canonical subtrees
# of its range; "running" partials are one opaque sum per rank (rank r's leaves summed in order).
# Uneven splits, ranks with no batch, and matrices with fewer rows than ranks (an empty row chunk).
CASES = {
    2: [("tree_rank0_empty", "tree", "full", (9, 9), [(0, 0), (0, 6)]),
        ("tree_uneven", "tree", "full", (7, 7), [(0, 5), (5, 7)]),
        ("running_both", "running", "full", (9, 9), [(0, 3), (3, 4)]),
        ("tree_diag_1d", "tree", "diag", (11,), [(0, 1), (1, 4)])],
    3: [("tree_rank1_empty", "tree", "full", (10, 10), [(0, 5), (5, 5), (5, 7)]),
        ("tree_rows_lt_world", "tree", "full", (2, 6), [(0, 1), (1, 6), (6, 9)]),
        ("running_rank1_empty", "running", "full", (10, 10), [(0, 2), (2, 2), (2, 7)]),
        ("running_rows_lt_world", "running", "full", (2, 5), [(0, 3), (3, 4), (4, 6)]),
        ("tree_diag_1d", "tree", "diag", (13,), [(0, 3), (3, 3), (3, 4)])],
}


def leaf(g: int, shape):
    """Leaf g: magnitudes over 7 decades, so the association of a sum changes its bits."""
    import torch

    gen = torch.Generator().manual_seed(500 + g)
    return torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-3, 4, shape, generator=gen).float()


def running_partial(shape, start: int, stop: int):
    acc = None
    for g in range(start, stop):
        acc = leaf(g, shape) if acc is None else acc + leaf(g, shape)
    return acc


def partial(kind, mode, shape, span):
    from xpert_dist.stats.capture import InputStats
    from xpert_dist.stats.tree import TreeSum

    start, stop = span
    n = sum(g + 1 for g in range(start, stop))
    if kind == "running":
        return InputStats(running_partial(shape, start, stop), n, mode) if stop > start else InputStats(None, 0, mode)
    t = TreeSum()
    for g in range(start, stop):
        t.push(g, leaf(g, shape))
    if t.empty:
        return InputStats(None, 0, mode, nodes=[], span=None)
    return InputStats(None, n, mode, nodes=t.nodes(), span=(t.start, t.stop))


def reduce_both_paths(rank, world):
    """Each case reduced twice: reduce-scatter (threshold 0) and whole partials to the owner."""
    from xpert_dist.distributed import stats_reduce
    from xpert_dist.distributed.multirank import TorchDistContext

    calls = []
    real = stats_reduce.scatter_combine

    def counted(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    stats_reduce.scatter_combine = counted
    ctx = TorchDistContext(timeout_s=60)
    ctx.scatter_min_world = 2  # the default leaves 2 ranks on the whole-partials path
    out = {}
    for name, kind, mode, shape, spans in CASES[world]:
        for path, threshold in (("scatter", 0), ("whole", 1 << 62)):
            ctx.scatter_min_bytes = threshold
            red = ctx.reduce_stats({name: partial(kind, mode, shape, spans[rank])})[name]
            out[(name, path)] = {"n": red.n, "owner": ctx.owner_of(name), "diag": red.diag.numpy().tobytes(),
                                 "sum": red.sum.numpy().tobytes() if red.resident else None}
    ctx.barrier()
    ctx.close()
    return {"results": out, "scatter_calls": calls}


def dies_in_reduce_scatter(rank, world, timeout_s, victim):
    """``victim`` exits when it enters the reduce-scatter; the others must fail with DistributedError."""
    import os
    import time

    from xpert_dist.distributed import stats_reduce
    from xpert_dist.distributed.multirank import TorchDistContext
    from xpert_dist.errors import DistributedError

    real = stats_reduce.scatter_combine

    def maybe_die(*a, **k):
        if rank == victim:
            os._exit(17)
        return real(*a, **k)

    stats_reduce.scatter_combine = maybe_die
    ctx = TorchDistContext(timeout_s=timeout_s, scatter_min_bytes=0)
    t0 = time.monotonic()
    try:
        ctx.reduce_stats({"x": partial("tree", "full", (64, 64), (rank, rank + 1))})
        ctx.barrier()
    except DistributedError as e:
        return {"error": str(e), "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}
