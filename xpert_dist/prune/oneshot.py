"""One-shot pruning: ``prune(model, method, sparsity, calibration)``.

Works on a plain model and on a peft LoRA-wrapped model (then it scores the effective weights
W + s·B·A, merges them into the base and zeroes the pruned entries; with PBS the adapter's B
receives the compensating update, otherwise it is reset to zero).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import PruneConfig, validate, RunConfig
from ..distributed.context import DistContext
from ..models.structure import check_family
from .pruner import Pruner, StepReport


def prune(model: nn.Module, method: str, sparsity: float, calibration: torch.Tensor | None = None, *,
          ctx: DistContext | None = None, batch_size: int = 8, progress: bool = True,
          **options) -> StepReport:
    """Prune ``model`` in place; ``options`` are PruneConfig fields (pattern, group, variant, pbs, ...).

    PBS is off unless asked for (``pbs="diagonal"|"full"|"shared"``), since a plain model has no adapter.
    """
    options.setdefault("pbs", "off")
    cfg = dataclasses.replace(PruneConfig(), method=method, sparsity=sparsity, **options)
    validate(RunConfig(prune=cfg))
    check_family(model)
    pruner = Pruner(cfg, ctx, batch_size=batch_size, progress=progress)
    return pruner.step(model, calibration, sparsity, final=cfg.pbs == "off")
