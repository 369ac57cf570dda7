"""Canonical pairwise summation over global batch indices: bit-identical sums for any sharding.

Floating-point addition is not associative, so "sum the batches on each rank, then all-reduce"
gives results that depend on the world size, the shard boundaries and the reduction algorithm of
the backend. This module fixes the *tree* instead:

* Calibration batches have global indices ``0..K-1``; batch ``g`` contributes one leaf value
  ``v_g`` (e.g. ``X_gᵀX_g``).
* The canonical tree is the complete binary tree over leaves ``0..2^L-1``: node ``(l, i)`` covers
  leaves ``[i·2^l, (i+1)·2^l)`` and its value is ``value(l-1, 2i) + value(l-1, 2i+1)`` (left + right).
  Leaves at or beyond ``K`` are *absent*: a node whose right child is entirely absent takes its left
  child's value unchanged (no ``+ 0``), so the padding never touches a bit.
* A rank owning the contiguous range ``[a, b)`` streams its leaves in order through a binary
  counter (:class:`TreeSum`): two adjacent nodes of equal level merge when they are siblings. The
  counter holds at most ``⌊log2(b-a)⌋ + 2`` partial values, and at the end it holds exactly the
  *maximal aligned subtrees* inside ``[a, b)``, each computed with the canonical association.
* The owner of a statistic pushes the nodes of all ranks, in increasing global order, through the
  same counter (``push_node``) and folds the remainder (:meth:`TreeSum.total`); the result equals
  the canonical tree's root, which depends only on the leaf values and ``K``: identical bits for
  every world size, every contiguous partition, and every rerun.

Pure tensor code: no torch.distributed here (the transport lives in :mod:`xpert_dist.distributed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import StatisticsError


@dataclass
class Node:
    """A complete canonical subtree: level ``l``, index ``i``, covering leaves ``[i·2^l, (i+1)·2^l)``."""

    level: int
    index: int
    value: torch.Tensor

    @property
    def start(self) -> int:
        return self.index << self.level

    @property
    def stop(self) -> int:
        return (self.index + 1) << self.level


def _add(left: torch.Tensor, right: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``left + right`` (IEEE addition is commutative, so only the grouping matters for the bits)."""
    return left.add_(right) if inplace else left + right


class TreeSum:
    """Streaming canonical summation of consecutive leaves (a binary counter of partial sums).

    ``push(g, v)`` adds leaf ``g``; leaves must arrive as one contiguous increasing run (the first
    one may be any index). ``push_node(node)`` adds a whole canonical subtree (used by the owner to
    combine the partial results of several ranks). ``nodes()`` is the list of maximal aligned
    subtrees covering the pushed range; ``total()`` folds them into the canonical root value, which
    is the canonical sum of the whole range when it starts at leaf 0 (always the case for a
    single process and for the owner after combining every rank).

    ``inplace=True`` lets merges reuse the left operand's storage (the caller must not keep
    references to pushed tensors); the bits are the same either way.
    """

    def __init__(self, inplace: bool = True):
        self._stack: list[Node] = []
        self.start: int | None = None
        self.stop: int | None = None
        self.inplace = inplace
        self.max_live = 0  # peak number of partial values held (for memory accounting)

    # ------------------------------------------------------------------ building
    def push(self, index: int, value: torch.Tensor) -> None:
        self.push_node(Node(0, int(index), value))

    def push_node(self, node: Node) -> None:
        if node.level < 0 or node.index < 0:
            raise StatisticsError(f"tree node ({node.level}, {node.index}) has a negative level or index")
        if self.stop is None:
            self.start = node.start
        elif node.start != self.stop:
            raise StatisticsError(
                f"tree summation needs contiguous increasing batch indices: expected leaf {self.stop}, "
                f"got node covering [{node.start}, {node.stop})")
        self.stop = node.stop
        cur = node
        while self._stack:
            top = self._stack[-1]
            if top.level == cur.level and top.index % 2 == 0 and top.index + 1 == cur.index:
                self._stack.pop()
                cur = Node(cur.level + 1, top.index // 2, _add(top.value, cur.value, self.inplace))
            else:
                break
        self._stack.append(cur)
        self.max_live = max(self.max_live, len(self._stack))

    def extend(self, nodes: Iterable[Node]) -> None:
        for n in nodes:
            self.push_node(n)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._stack)

    @property
    def empty(self) -> bool:
        return not self._stack

    def nodes(self) -> list[Node]:
        """The maximal aligned subtrees of the pushed range, in increasing leaf order."""
        return list(self._stack)

    def total(self, consume: bool = False) -> torch.Tensor:
        """The canonical root value of the pushed range (see the module docstring).

        The stack holds subtrees of strictly decreasing size from left to right; folding from the
        right (``left + (rest)``) is exactly the canonical tree with absent leaves beyond ``stop``
        when ``start == 0``. ``consume=False`` leaves the stack untouched (one new tensor);
        ``consume=True`` folds in place into the partial values and empties the stack.
        """
        if not self._stack:
            raise StatisticsError("tree summation is empty: no batch was pushed")
        return fold_nodes(self._stack, consume=consume)


def fold_nodes(nodes: Sequence[Node], consume: bool = False) -> torch.Tensor:
    """Fold consecutive maximal subtrees (decreasing size, left to right) from the right."""
    acc = nodes[-1].value
    for node in reversed(nodes[:-1]):
        acc = node.value.add_(acc) if consume else node.value + acc
    if consume and isinstance(nodes, list):
        nodes.clear()
    return acc


def maximal_nodes(start: int, stop: int) -> list[tuple[int, int]]:
    """``(level, index)`` of the maximal aligned subtrees covering ``[start, stop)``, in order.

    Exactly the nodes a :class:`TreeSum` fed the leaves ``start..stop-1`` ends with (so every rank
    can compute what every other rank will send without communicating).
    """
    out: list[tuple[int, int]] = []
    a = start
    while a < stop:
        level = (a & -a).bit_length() - 1 if a else (stop - a).bit_length() - 1
        while a + (1 << level) > stop:
            level -= 1
        out.append((level, a >> level))
        a += 1 << level
    return out


def canonical_sum(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The canonical tree sum of ``values[0..K-1]`` computed recursively (reference implementation)."""
    if not values:
        raise StatisticsError("canonical_sum of no values")
    size = 1
    while size < len(values):
        size *= 2

    def rec(lo: int, width: int) -> torch.Tensor | None:
        if lo >= len(values):
            return None
        if width == 1:
            return values[lo].clone()
        half = width // 2
        left, right = rec(lo, half), rec(lo + half, half)
        return left if right is None else left + right

    return rec(0, size)


def contiguous_shard(n_batches: int, world_size: int, rank: int) -> range:
    """Rank ``rank``'s contiguous, balanced share of ``range(n_batches)`` (sizes differ by ≤ 1)."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise StatisticsError(f"bad shard request: rank {rank} of world size {world_size}")
    return range(rank * n_batches // world_size, (rank + 1) * n_batches // world_size)


def max_partials(n_leaves: int) -> int:
    """Upper bound on the partial values a :class:`TreeSum` holds for ``n_leaves`` consecutive leaves
    (any start), counting the one being merged: ``2·⌈log2(n+1)⌉`` for unaligned starts; for the
    memory planner."""
    if n_leaves <= 0:
        return 0
    return 2 * max(1, (n_leaves).bit_length())
