"""How the pruning code talks to the distributed world: one object, single-process by default.

The prune pipeline never calls torch.distributed or DeepSpeed directly; it asks a DistContext to
gather a block's weights, reduce statistics, compute per-module results on their owner rank and
share them, and write weights back (frozen base weights through a modifier gather, trainable LoRA
weights through DeepSpeed's fp32-master-aware setter). ``DistContext()`` is the single-process
implementation; the multi-rank / ZeRO-3 one lives beside it.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..stats.capture import InputStats


class DistContext:
    """Single process, no ZeRO: every method is the identity or a direct write."""

    rank = 0
    world_size = 1
    zero3 = False

    def shard(self, n_batches: int) -> range:
        """Global calibration batch indices this rank processes."""
        return range(n_batches)

    def gather(self, params, modify: bool = False) -> contextlib.AbstractContextManager:
        """Materialise ``params`` (an iterable of parameters or a module) for reading/writing."""
        return contextlib.nullcontext()

    def reduce_stats(self, stats: dict[str, InputStats]) -> dict[str, InputStats]:
        """Sum the statistics of all ranks (deterministically); single process: unchanged."""
        return stats

    def compute_owned(self, keys: list[str], sizes: dict[str, int],
                      fn: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Run ``fn(key)`` on the rank owning ``key`` and share its tensors with every rank."""
        return {k: fn(k) for k in keys}

    def write_frozen(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Overwrite a frozen (base) weight; must be called inside ``gather(..., modify=True)``."""
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))

    def write_trainable(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Overwrite a trainable weight (LoRA); outside any gather."""
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def barrier(self) -> None:
        pass
