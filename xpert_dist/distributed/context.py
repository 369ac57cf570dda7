"""How the pruning code talks to the distributed world: one object, single-process by default.

The prune pipeline never calls torch.distributed or DeepSpeed directly; it asks a DistContext to
gather a block's weights, reduce statistics, compute per-module results on their owner rank and
share them, and write weights back (frozen base weights through a modifier gather, trainable LoRA
weights through DeepSpeed's fp32-master-aware setter). ``DistContext()`` is the single-process
implementation; :class:`TorchDistContext` is the multi-rank / ZeRO-3 one; ``from_environment()``
picks between them.

Determinism contract (multi-rank): calibration batch ``g`` is processed by exactly one rank
(contiguous shares, ``shard``); its statistic is a leaf of the canonical pairwise tree over the
global batch indices (:mod:`xpert_dist.stats.tree`); ranks send the maximal aligned subtrees of
their share to the statistic's owner, which combines them up the same tree. The owner's result
is bit-identical for every world size and rerun (given bit-identical leaves, i.e. the same
kernels on the same hardware), and so is everything computed from it on the owner and broadcast
(masks, PBS updates).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable

import torch
from torch import nn

from ..stats.capture import InputStats
from ..stats.tree import contiguous_shard

log = logging.getLogger(__name__)


class DistContext:
    """Single process, no ZeRO: every method is the identity or a direct write."""

    rank = 0
    world_size = 1
    zero3 = False
    partials_device = None  # where calibration tree partials live (None: where they are computed)

    # ------------------------------------------------------------------ work split
    def shard(self, n_batches: int) -> range:
        """Global calibration batch indices this rank processes (a contiguous run)."""
        return contiguous_shard(n_batches, self.world_size, self.rank)

    def global_batch_indices(self, n_local: int) -> range:
        """Global indices of this rank's ``n_local`` batches when ranks hold consecutive runs in rank
        order (what ``shard`` gives); a collective under several ranks."""
        return range(n_local)

    def owner_of(self, key: str) -> int:
        return 0

    # ------------------------------------------------------------------ weights
    def calibration_scope(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context for calibration forwards of ``model`` (ZeRO-3: without DeepSpeed's fetch hooks)."""
        return contextlib.nullcontext()

    def gather(self, params, modify: bool = False) -> contextlib.AbstractContextManager:
        """Materialise ``params`` (an iterable of parameters or a module) for reading/writing."""
        return contextlib.nullcontext()

    def write_frozen(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Overwrite a frozen (base) weight; must be called inside ``gather(..., modify=True)``."""
        with torch.no_grad():
            param.data.copy_(value.reshape(param.shape).to(param.dtype))

    def write_trainable(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Overwrite a trainable weight (LoRA); outside any gather."""
        with torch.no_grad():
            param.data.copy_(value.reshape(param.shape).to(param.dtype))

    # ------------------------------------------------------------------ statistics and results
    def reduce_stats(self, stats: dict[str, InputStats], replicate: bool = False,
                     rotation: int | None = None) -> dict[str, InputStats]:
        """Sum the statistics of all ranks (deterministically); single process: unchanged. ``rotation``
        shifts the owner ranks (a prune step passes the block index, so a block's owners are the same at
        every step)."""
        return stats

    def compute_owned(self, keys: list[str], sizes: dict[str, int],
                      fn: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Run ``fn(key)`` on the rank owning ``key`` and share its tensors with every rank."""
        return {k: fn(k) for k in keys}

    # ------------------------------------------------------------------ plain collectives
    def broadcast_object(self, obj, src: int = 0):
        return obj

    def all_gather_object(self, obj) -> list:
        return [obj]

    def phase(self, name: str) -> None:
        """Post the phase this rank enters (multi-rank contexts name it when a collective fails)."""

    def one_rank(self, phase: str, src: int = 0) -> contextlib.AbstractContextManager:
        """Work that only rank ``src`` does (see the multi-rank context); here: just run it."""
        return contextlib.nullcontext()

    def wait_for(self, phase: str, src: int = 0) -> None:
        pass

    def barrier(self, after: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def from_environment(zero3: bool | None = None, timeout_s: float | None = None,
                     partials_device: torch.device | str | None = None) -> DistContext:
    """The right context for this process: :class:`TorchDistContext` when torch.distributed is
    initialised or the environment describes several ranks (it is then initialised), otherwise
    the single-process :class:`DistContext`."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dist.is_available() and (dist.is_initialized() or world > 1):
        from .multirank import TorchDistContext

        return TorchDistContext(zero3=zero3, timeout_s=timeout_s, partials_device=partials_device)
    return DistContext()


def __getattr__(name: str):
    """``TorchDistContext`` lives in ``multirank.py``; kept importable from here."""
    if name == "TorchDistContext":
        from .multirank import TorchDistContext

        return TorchDistContext
    raise AttributeError(name)
