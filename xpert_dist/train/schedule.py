"""When prune steps happen and at which sparsity (METHOD.md, "Training algorithm")."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import PruneConfig, mask_final_fraction


@dataclass(frozen=True)
class PrunePlan:
    """Optimizer-step indices *before* which an in-loop prune step runs, their sparsities, and
    whether a prune step runs before training starts (Wanda-then-LoRA), and ``mask_final_at``: the
    step index before which the final mask is chosen (0 with ``before_training``); from then on the
    LoRA delta trains masked and the step after training only verifies sparsity. None: the step after
    training chooses the final mask (``prune.mask_final=end``, or no prune step in the loop)."""

    steps: tuple[int, ...]
    sparsities: tuple[float, ...]
    before_training: bool
    mask_final_at: int | None = None

    def frozen_before(self, step: int) -> bool:
        """Whether the final mask was already chosen before optimizer step ``step`` starts (the prune
        step at ``mask_final_at`` itself runs in the loop, so a run resumed there has not done it)."""
        return self.mask_final_at is not None and (self.mask_final_at == 0 or step > self.mask_final_at)


def ramp(target: float, k: int, n: int, kind: str) -> float:
    """Sparsity of prune step k (1-based) of n: constant, or cubic (Zhu & Gupta 2017) towards target."""
    if kind == "constant" or n <= 0:
        return target
    frac = min(1.0, k / n)
    return target * (1.0 - (1.0 - frac) ** 3)


def final_step(frac: float, total_steps: int) -> int | None:
    """The optimizer step before which ``prune.mask_final=fraction:<frac>`` makes the mask final (inside the run)."""
    return max(1, min(total_steps - 1, round(frac * total_steps))) if total_steps > 1 else None


def evenly_spaced(n: int, total_steps: int, frac: float | None) -> tuple[int, ...]:
    """``prune.prune_steps=n``: n prune steps at round(k·S/n), k = 1..n, where S is the step that makes the mask
    final (round(frac·total), frac from ``prune.mask_final=fraction:<f>``), else at round(k·total/(n+1)) (the
    last one leaves as many steps to recover as lie between two prune steps). Repeats and steps outside
    [1, total) are dropped (a run too short for n steps gets fewer)."""
    span = final_step(frac, total_steps) if frac is not None else None
    if span is not None:
        at = [round(k * span / n) for k in range(1, n + 1)]
    else:
        at = [round(k * total_steps / (n + 1)) for k in range(1, n + 1)]
    return tuple(sorted({s for s in at if 1 <= s < total_steps}))


def plan_prune_steps(cfg: PruneConfig, steps_per_epoch: int, total_steps: int) -> PrunePlan:
    """Prune steps at the start of every epoch after the first (``epoch``), every ``prune_every``
    optimizer steps or ``prune_steps`` of them evenly spaced (``steps``), or none in the loop
    (``final_only``, ``before_training``).
    After training the pipeline runs the final prune step (unless method is none), or, when the final
    mask was chosen in the loop (``mask_final_at``), only verifies its sparsity."""
    if cfg.method == "none":
        return PrunePlan((), (), False)
    frac = mask_final_fraction(cfg.mask_final)
    if cfg.schedule == "epoch":
        steps = tuple(s for s in range(steps_per_epoch, total_steps, steps_per_epoch))
    elif cfg.schedule == "steps" and cfg.prune_steps > 0:
        steps = evenly_spaced(cfg.prune_steps, total_steps, frac)
    elif cfg.schedule == "steps":
        steps = tuple(range(cfg.prune_every, total_steps, cfg.prune_every))
    else:
        steps = ()
    before = cfg.schedule == "before_training"
    final_at = None
    if cfg.mask_final != "end":
        if before:
            final_at = 0
        elif frac is not None and cfg.schedule in ("epoch", "steps"):
            final_at = final_step(frac, total_steps)
            if final_at is not None:
                steps = tuple(s for s in steps if s < final_at) + (final_at,)
        elif steps:
            final_at = steps[-1]
    n = len(steps) + (0 if final_at is not None else 1)  # the step choosing the final mask reaches the target
    sparsities = tuple(ramp(cfg.sparsity, k + 1, n, cfg.ramp) for k in range(len(steps)))
    return PrunePlan(steps, sparsities, before, final_at)
