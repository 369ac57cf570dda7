"""Pure measures of how two pruning decisions differ: IoU of kept sets, Spearman rank correlation of
scores, mask movement between prune steps, and their aggregation per layer and per module type.

Tensors in, Python floats out; no models, no I/O. Masks are ``torch.bool``, **True = keep**
(docs/ARCHITECTURE.md). Matrix names are full Hugging Face names (``model.layers.3.mlp.up_proj``);
aggregation reads the layer index and the module short name from them.

Conventions (chosen so that every case has a defined value):

- ``iou(a, b) = |a ∧ b| / |a ∨ b|``; two *empty* kept sets are identical, so their IoU is 1.0.
- ``spearman(a, b)``: Pearson correlation of the *average* ranks (ties share the mean of the ranks
  they span, as in ``scipy.stats.spearmanr``); NaN when either tensor is constant (no ranking) or
  has fewer than two entries.
- ``moved_share(prev, new) = |prev ∧ ¬new| / |prev|``: the share of the previously kept set that is
  no longer kept (the Pruner's ``StepReport.moved``); 0.0 when nothing was kept before.
- ``aggregate``: a mean per layer / module type / overall, optionally weighted. The *pooled* IoU of
  several matrices, ``Σ|a∧b| / Σ|a∨b|``, is the union-weighted mean of their IoUs, so passing the
  union sizes as weights aggregates IoU exactly; ``pooled_iou`` computes it from the counts.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..config import LLAMA_LINEARS
from ..errors import StatisticsError
from ..maths.scores import check_finite
from ..report.results import parse_module, sparsity_grid

__all__ = ["overlap_counts", "iou", "random_iou", "changed_share", "average_ranks", "spearman", "spearman_from_ranks",
           "moved_share", "aggregate", "pooled_iou", "grid", "movement_from_reports"]

BY = ("layer", "module", "all")


def _check_masks(a: Tensor, b: Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dtype != torch.bool:
            raise StatisticsError(f"mask {name} must be a torch.bool tensor (True = keep), got "
                                  f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if a.shape != b.shape:
        raise StatisticsError(f"masks have different shapes {tuple(a.shape)} and {tuple(b.shape)}")


def overlap_counts(a: Tensor, b: Tensor) -> tuple[int, int]:
    """``(|a ∧ b|, |a ∨ b|)`` of two keep masks of one shape."""
    _check_masks(a, b)
    return int((a & b).sum()), int((a | b).sum())


def iou(a: Tensor, b: Tensor) -> float:
    """Intersection over union of the kept sets; 1.0 when both are empty."""
    inter, union = overlap_counts(a, b)
    return 1.0 if union == 0 else inter / union


def random_iou(sparsity: float) -> float:
    """Expected IoU of two independent random masks that each keep ``1 - sparsity`` of the entries:
    ``k² / (2k - k²) = k / (2 - k)`` with ``k = 1 - sparsity`` (the "no shared structure" level)."""
    k = 1.0 - float(sparsity)
    if not 0.0 <= k <= 1.0:
        raise StatisticsError(f"sparsity {sparsity} must be in [0, 1]")
    return 1.0 if k == 0.0 else k / (2.0 - k)


def changed_share(iou_value: float) -> float:
    """For two kept sets of equal size with IoU ``iou_value``: the share of one that the other does not
    keep, ``(1 - IoU) / (1 + IoU)`` (masks at one exact sparsity have equal-size kept sets)."""
    return (1.0 - iou_value) / (1.0 + iou_value)


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of the entries of ``x`` (flattened), float64; tied entries get the mean of their ranks."""
    if not isinstance(x, Tensor):
        raise StatisticsError(f"scores must be a tensor, got {type(x).__name__}")
    check_finite("scores", x)
    flat = x.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    values, order = torch.sort(flat, stable=True)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last member
    mean_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def spearman_from_ranks(ra: Tensor, rb: Tensor) -> float:
    """Pearson correlation of two rank vectors (see ``average_ranks``); NaN when one is constant."""
    if ra.shape != rb.shape:
        raise StatisticsError(f"rank vectors have different shapes {tuple(ra.shape)} and {tuple(rb.shape)}")
    if ra.numel() < 2:
        return math.nan
    ca = ra.to(torch.float64) - ra.to(torch.float64).mean()
    cb = rb.to(torch.float64) - rb.to(torch.float64).mean()
    den = math.sqrt(float((ca * ca).sum()) * float((cb * cb).sum()))
    if den == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float((ca * cb).sum()) / den))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score tensors of one shape (average ranks for ties)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise StatisticsError("spearman needs two tensors")
    if a.shape != b.shape:
        raise StatisticsError(f"score tensors have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return spearman_from_ranks(average_ranks(a), average_ranks(b))


def moved_share(prev: Tensor, new: Tensor) -> float:
    """Share of the previously kept entries that ``new`` no longer keeps (0.0 if ``prev`` kept nothing)."""
    _check_masks(prev, new)
    kept = int(prev.sum())
    return 0.0 if kept == 0 else int((prev & ~new).sum()) / kept


def _key(name: str, by: str):
    parsed = parse_module(name)
    if parsed is None:
        return None
    return parsed[0] if by == "layer" else parsed[1] if by == "module" else "all"


def aggregate(values: Mapping[str, float], by: str = "layer", weights: Mapping[str, float] | None = None
              ) -> dict:
    """Mean of per-matrix ``values`` per layer (int keys, ascending), per module type (Llama order) or
    over everything (``"all"``). ``weights`` (same names) make it a weighted mean. NaN values and
    names outside numbered layers are skipped; a group whose weights sum to 0 gets NaN."""
    if by not in BY:
        raise StatisticsError(f"aggregate by={by!r}; use one of {BY}")
    sums: dict = {}
    for name, v in values.items():
        key = _key(name, by)
        if key is None or v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        w = 1.0 if weights is None else float(weights[name])
        s, ws = sums.get(key, (0.0, 0.0))
        sums[key] = (s + w * float(v), ws + w)
    return _ordered({k: (s / ws if ws > 0 else math.nan) for k, (s, ws) in sums.items()}, by)


def _ordered(out: dict, by: str) -> dict:
    if by == "layer":
        return dict(sorted(out.items()))
    if by == "module":
        order = [m for m in LLAMA_LINEARS if m in out] + sorted(set(out) - set(LLAMA_LINEARS))
        return {m: out[m] for m in order}
    return out


def pooled_iou(counts: Mapping[str, tuple[int, int]], by: str = "layer") -> dict:
    """``Σ|a∧b| / Σ|a∨b|`` per group from per-matrix ``(intersection, union)`` counts (1.0 for a group
    whose kept sets are all empty)."""
    if by not in BY:
        raise StatisticsError(f"pooled_iou by={by!r}; use one of {BY}")
    sums: dict = {}
    for name, (inter, union) in counts.items():
        key = _key(name, by)
        if key is None:
            continue
        i, u = sums.get(key, (0, 0))
        sums[key] = (i + int(inter), u + int(union))
    out = {k: (1.0 if u == 0 else i / u) for k, (i, u) in sums.items()}
    return _ordered(out, by)


def grid(values: Mapping[str, float]) -> tuple[list[int], list[str], list[list[float]]]:
    """``(layers, modules, grid[layer][module])`` of per-matrix values, NaN where absent."""
    return sparsity_grid(dict(values))


def movement_from_reports(reports: Iterable[Mapping]) -> list[dict]:
    """The per-matrix ``moved`` shares of every prune step that has them (from ``results.json``'s
    ``prune_reports`` or ``Pruner.reports``): ``[{"step", "final", "moved": {name: share}}, ...]``."""
    out = []
    for r in reports:
        r = r if isinstance(r, Mapping) else r.__dict__
        moved = dict(r.get("moved") or {})
        if moved:
            out.append({"step": int(r.get("step", len(out))), "final": bool(r.get("final", False)), "moved": moved})
    return out
