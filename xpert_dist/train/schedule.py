"""When prune steps happen and at which sparsity (METHOD.md, "Training algorithm")."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import PruneConfig


@dataclass(frozen=True)
class PrunePlan:
    """Optimizer-step indices *before* which an in-loop prune step runs, their sparsities, and
    whether a prune step runs before training starts (Wanda-then-LoRA)."""

    steps: tuple[int, ...]
    sparsities: tuple[float, ...]
    before_training: bool


def ramp(target: float, k: int, n: int, kind: str) -> float:
    """Sparsity of prune step k (1-based) of n: constant, or cubic (Zhu & Gupta 2017) towards target."""
    if kind == "constant" or n <= 0:
        return target
    frac = min(1.0, k / n)
    return target * (1.0 - (1.0 - frac) ** 3)


def plan_prune_steps(cfg: PruneConfig, steps_per_epoch: int, total_steps: int) -> PrunePlan:
    """Prune steps at the start of every epoch after the first (``epoch``), every ``prune_every``
    optimizer steps (``steps``), or none in the loop (``final_only``, ``before_training``).
    The final prune step after training is always run by the pipeline (unless method is none)."""
    if cfg.method == "none":
        return PrunePlan((), (), False)
    if cfg.schedule == "epoch":
        steps = tuple(s for s in range(steps_per_epoch, total_steps, steps_per_epoch))
    elif cfg.schedule == "steps":
        steps = tuple(range(cfg.prune_every, total_steps, cfg.prune_every))
    else:
        steps = ()
    n = len(steps) + 1  # the final step reaches the target
    sparsities = tuple(ramp(cfg.sparsity, k + 1, n, cfg.ramp) for k in range(len(steps)))
    return PrunePlan(steps, sparsities, cfg.schedule == "before_training")
