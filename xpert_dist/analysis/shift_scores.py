"""Pruning scores as the shift analysis needs them: recorded during a prune step, recomputed per block.

Both go through :class:`~xpert_dist.prune.pruner.Pruner`'s own scoring, so the analysis ranks weights
exactly as a run does.
"""
from __future__ import annotations

import torch

from ..config import PruneConfig
from ..models import structure as st
from ..prune.block import ModuleInput
from ..prune.pruner import Pruner
from ..stats.capture import InputStats


class RecordingPruner(Pruner):
    """A Pruner that keeps the per-block diag statistics it scores with (to recompute scores later)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: dict[int, dict[str, tuple[torch.Tensor, int]]] = {}

    def _block_scores(self, inputs, stats, geo, block, layers, i):
        if stats is not None:
            self.recorded[i] = {g: (s.diag.detach().cpu().clone(), s.n) for g, s in stats.items()}
        return super()._block_scores(inputs, stats, geo, block, layers, i)


def layer_scores(model, i: int, layer_stats: dict | None, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """Scores of block ``i``'s pruned linears (full names), exactly as the Pruner computes them."""
    layers = st.blocks(model)
    block = layers[i]
    linears = st.block_linears(block, cfg.modules)
    prefix = f"model.layers.{i}"
    inputs = {n: ModuleInput(st.effective_weight(m)) for n, m in linears.items()}
    stats = None
    if layer_stats:
        stats = {g: InputStats(diag, int(n), "diag") for g, (diag, n) in layer_stats.items()}
    pruner = Pruner(cfg, progress=False)
    with torch.no_grad():
        scores = pruner._block_scores(inputs, stats, st.geometry(model), block, layers, i)
    return {f"{prefix}.{'self_attn' if n in st.ATTN else 'mlp'}.{n}": s.float() for n, s in scores.items()}
