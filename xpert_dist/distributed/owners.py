"""Which rank owns which statistic (and computes the modules that read it).

Greedy longest-processing-time (LPT) bin packing: items sorted by size, largest first (ties by
key), each placed on the currently least-loaded rank (ties by lowest rank). Deterministic: every
rank computes the same assignment from the same ``sizes`` without communicating.

Balance guarantee (Graham's list-scheduling argument, proved in :func:`balance_bound`): with
``W`` ranks, total ``T``, mean ``T/W`` and largest item ``p_max``,

    max load ≤ max(p_max, mean·(1 + ε_W)),   ε_W = (W − 1)/(W + 1)  (< 1),

and the data-dependent form ``max load ≤ max(p_max, mean + p_c·(1 − 1/W))`` where ``p_c`` is the
smallest item that was ever placed on a non-empty rank. LPT is also within ``4/3 − 1/(3W)`` of the
optimal makespan. For one Llama block the items are the four input groups: ``down_in``
(``intermediate²``) dominates, so the maximum is ``p_max`` whenever ``W ≥ 2``.
"""
from __future__ import annotations

from typing import Hashable, Mapping

from ..errors import ConfigError


def assign_owners(sizes: Mapping[Hashable, int], world_size: int) -> dict:
    """``{key: rank}``: greedy largest-first packing of ``sizes`` (bytes) onto ``world_size`` ranks."""
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be >= 1")
    for k, v in sizes.items():
        if not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"size of {k!r} is {v!r}; sizes must be non-negative numbers")
    loads = [0] * world_size
    out = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], str(k))):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        out[key] = rank
        loads[rank] += sizes[key]
    return out


def loads(owners: Mapping[Hashable, int], sizes: Mapping[Hashable, int], world_size: int) -> list[int]:
    out = [0] * world_size
    for k, r in owners.items():
        out[r] += sizes[k]
    return out


def balance_bound(sizes: Mapping[Hashable, int], world_size: int) -> float:
    """The a-priori upper bound on the LPT maximum load: ``max(p_max, mean·(1 + (W−1)/(W+1)))``.

    Proof sketch: let rank j attain the maximum and p be the last item placed on it. If p is its
    only item, the maximum is ``p ≤ p_max``. Otherwise every rank was non-empty when p was placed
    (an empty rank would have been chosen), each holding an earlier item ≥ p, so ``T ≥ (W+1)·p``,
    i.e. ``p ≤ W·mean/(W+1)``; and j was least loaded, so ``load_j − p ≤ (T − p)/W``. Hence
    ``load_j ≤ mean + p·(1 − 1/W) ≤ mean·(1 + (W−1)/(W+1))``.
    """
    if not sizes:
        return 0.0
    total = float(sum(sizes.values()))
    mean = total / world_size
    return max(float(max(sizes.values())), mean * (1.0 + (world_size - 1) / (world_size + 1)))
