"""All-reduce along the canonical pairwise tree: every rank gets bit-identical sums for any world size.

Each rank holds the canonical subtrees of a contiguous run of leaves (a :class:`TreeSum` fed its
leaves in order); the runs of all ranks tile ``[0, n_leaves)`` in rank order. Every rank
broadcasts its subtrees (their levels and indices follow from the run, so only the values
travel), and every rank folds all of them, in global order, through the same binary counter. The
result is the canonical tree's root over the leaf values, the same bits as one process summing
the leaves itself (:func:`xpert_dist.stats.tree.canonical_sum`), whatever the split.

Used by the reproducibility mode of the training engine for LoRA gradients (one flat vector per
leaf); the statistics use the same tree through :class:`~xpert_dist.distributed.multirank.TorchDistContext`.
"""
from __future__ import annotations

import torch

from ..stats.tree import Node, TreeSum, maximal_nodes
from .comm import guard


def tree_all_reduce(local: TreeSum, ranges: list[tuple[int, int]], numel: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu", group=None, timeout_s: float | None = None) -> torch.Tensor:
    """Canonical sum over all ranks' leaves; ``ranges[r] = (start, stop)`` of rank r's leaves.

    Without torch.distributed (or with one rank) it is ``local.total()``. ``local`` must hold exactly
    the subtrees of ``ranges[rank]``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return local.total()
    rank = dist.get_rank(group)
    mine = [(n.level, n.index) for n in local.nodes()]
    if mine != maximal_nodes(*ranges[rank]):
        raise ValueError(f"rank {rank}: local tree nodes {mine} do not match its leaf range {ranges[rank]}")
    total = TreeSum(inplace=True)
    for r, (start, stop) in enumerate(ranges):
        shape = maximal_nodes(start, stop)
        if not shape:
            continue
        if r == rank:
            buf = torch.stack([n.value.reshape(-1) for n in local.nodes()])
        else:
            buf = torch.empty(len(shape), numel, dtype=dtype, device=device)
        with guard(f"tree_all_reduce: broadcast from rank {r}", rank, peer=r if r != rank else None,
                   timeout_s=timeout_s):
            dist.broadcast(buf, src=r, group=group)
        for (level, index), value in zip(shape, buf):
            total.push_node(Node(level, index, value.clone()))
    return total.total(consume=True)
