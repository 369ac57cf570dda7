"""Mask selection from scores: exact-count unstructured masks, N:M masks, OWL layer sparsities.

Masks are ``torch.bool`` of the weight's shape, **True = keep**. Higher score = more important.

Exact-count rule (the exported model must have exactly the target sparsity in every matrix):
a matrix of ``numel`` entries pruned at sparsity ``s`` loses exactly ``prune_count(s, numel) =
round(s·numel)`` entries (Python ``round``: halves go to the even integer). With comparison
groups of size ``g`` (``G`` groups), every group first prunes ``floor(s·g)`` of its lowest
scores; the remaining ``r = round(s·numel) − G·floor(s·g)`` extra prunes (``0 <= r <= G``) go,
one each, to the ``r`` groups whose *next* candidate (their lowest still-kept score) is the
lowest; ties between groups go to the lower group index. So per-group counts differ by at most 1.

Determinism: among equal scores the lower index (row-major for ``group="layer"``) is pruned first,
as a stable ascending sort would order them (``select_mask`` reaches that result by a partial
selection, ``topk``, and a threshold, without sorting every row). Masks are bit-identical on
reruns given identical scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.scores import check_finite

__all__ = [
    "GROUPS",
    "prune_count",
    "select_mask",
    "nm_mask",
    "parse_pattern",
    "owl_outlier_ratio",
    "owl_sparsities",
    "sparsity_of",
]

GROUPS = ("output", "input", "layer")


def _check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or not math.isfinite(s):
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise StatisticsError(f"scores must be a 2-D tensor [out, in], got {shape}")
    check_finite("scores", scores)


def prune_count(sparsity: float, numel: int) -> int:
    """Number of entries pruned from a matrix of ``numel`` entries: ``round(sparsity·numel)``."""
    return int(round(_check_sparsity(sparsity) * int(numel)))


def select_mask(scores: Tensor, sparsity: float, group: str = "output") -> Tensor:
    """Keep mask pruning exactly ``round(sparsity·numel)`` lowest-scoring entries of ``scores``.

    ``group`` is the comparison group: ``"output"`` compares within each output row (Wanda's
    choice), ``"input"`` within each input column, ``"layer"`` across the whole matrix. Counts
    per group follow the exact-count rule in the module docstring.
    """
    _check_scores(scores)
    s = _check_sparsity(sparsity)
    if group not in GROUPS:
        raise ConfigError(f"group must be one of {GROUPS}, got {group!r}")
    if group == "output":
        S = scores
    elif group == "input":
        S = scores.t()
    else:
        S = scores.reshape(1, -1)
    n_groups, g = S.shape
    k = prune_count(s, scores.numel())
    if k == 0 or g == 0:
        keep = torch.ones(S.shape, dtype=torch.bool, device=scores.device)
        return keep.t().contiguous() if group == "input" else keep.reshape(scores.shape)
    base = min(math.floor(s * g + 1e-9), k // n_groups)  # 1e-9: 0.29*100 -> 29, not 28
    extra = k - base * n_groups  # 0 <= extra <= n_groups
    # the base+1 lowest scores of each group (unordered): a partial selection, not a sort
    low = torch.topk(S, base + 1, dim=1, largest=False, sorted=False).values  # base < g since s < 1
    nxt = low.max(dim=1).values  # each group's (base+1)-th lowest score: its lowest still-kept one
    counts = torch.full((n_groups,), base, dtype=torch.long, device=scores.device)
    if extra > 0:
        order = torch.sort(nxt, stable=True).indices  # ties -> lower group index
        counts[order[:extra]] += 1
    keep = ~_prune_lowest(S, counts, base, low, nxt)
    if group == "input":
        return keep.t().contiguous()
    return keep.reshape(scores.shape)


def _prune_lowest(S: Tensor, counts: Tensor, base: int, low: Tensor, nxt: Tensor) -> Tensor:
    """Rows of ``S`` with ``counts[r]`` (``base`` or ``base+1``) of their lowest entries marked, among
    equal scores the lower index first: exactly what a stable ascending sort would prune, from the
    ``base+1`` lowest scores ``low`` of each row (any order) and their maximum ``nxt``.

    The ``c``-th lowest score ``t`` of a row is the threshold: every entry below it is pruned, and of
    the entries equal to it the ``c − #below`` with the lowest indices."""
    if base > 0:  # the base-th lowest: second largest of ``low``, duplicates counted
        kth = torch.topk(low, 2, dim=1).values[:, 1]
    else:
        kth = torch.full_like(nxt, -math.inf)  # nothing to prune below the first entry
    t = torch.where(counts > base, nxt, kth)[:, None]
    below = S < t
    need = counts - below.sum(dim=1)  # >= 0: fewer than c entries lie below the c-th lowest
    equal = S == t
    return below | (equal & (equal.cumsum(dim=1) <= need[:, None]))


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M keep mask: keep the ``n`` highest of every ``m`` consecutive inputs of each row.

    ``2:4`` keeps 2 of 4, ``4:8`` keeps 4 of 8. Requires ``0 < n < m`` and ``in % m == 0``.
    Ties: lower input index pruned first (stable sort).
    """
    _check_scores(scores)
    n, m = _check_nm(n, m)
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs the input size ({in_f}) to be divisible by m={m}")
    blocks = scores.reshape(out_f, in_f // m, m)
    idx = torch.sort(blocks, dim=2, stable=True).indices
    keep_sorted = torch.arange(m, device=scores.device) >= (m - n)
    keep = torch.empty(blocks.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(2, idx, keep_sorted.expand(blocks.shape).contiguous())
    return keep.reshape(out_f, in_f)


def _check_nm(n, m) -> tuple[int, int]:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ConfigError(f"N:M pattern needs integers n, m, got n={n!r}, m={m!r}")
    if not (0 < n < m):
        raise ConfigError(f"N:M pattern needs 0 < n < m (keep n of every m), got {n}:{m}")
    return n, m


def parse_pattern(s) -> tuple[int, int] | None:
    """``"unstructured"`` (or None) -> None; ``"2:4"`` -> ``(2, 4)`` (keep 2 of every 4)."""
    if s is None:
        return None
    if isinstance(s, (tuple, list)) and len(s) == 2:
        return _check_nm(*s)
    if not isinstance(s, str):
        raise ConfigError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {s!r}")
    t = s.strip().lower()
    if t == "unstructured":
        return None
    parts = t.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {s!r}")
    return _check_nm(int(parts[0]), int(parts[1]))


def owl_outlier_ratio(scores: Tensor | Sequence[Tensor], m: float = 5.0) -> float:
    """OWL layerwise outlier ratio (Yin et al. 2023): share of entries with score > m·mean.

    ``scores`` is one tensor or a sequence of tensors (all matrices of one layer, pooled as in
    the OWL code: one mean over the concatenation). Returns a fraction in [0, 1].
    """
    if isinstance(scores, Tensor):
        flat = scores.reshape(-1)
    else:
        if len(scores) == 0:
            raise StatisticsError("owl_outlier_ratio needs at least one score tensor")
        flat = torch.cat([t.reshape(-1) for t in scores])
    if flat.numel() == 0:
        raise StatisticsError("owl_outlier_ratio got an empty score tensor")
    check_finite("scores", flat)
    if not (float(m) > 0):
        raise ConfigError(f"OWL threshold m must be > 0, got {m!r}")
    flat = flat.to(torch.float64)
    return float((flat > float(m) * flat.mean()).to(torch.float64).mean())


def owl_sparsities(ratios: Tensor, target: float, lam: float = 0.08) -> Tensor:
    """Per-layer sparsities from OWL outlier ratios: affine, decreasing in the ratio, mean = target.

    ``s_l = target − a·(r_l − mean r)`` with ``a = lam_eff / max_l |r_l − mean r|``, so the most
    extreme layer sits at ``target ± lam_eff`` and every value is within ``[target−lam,
    target+lam]``. ``lam_eff = min(lam, target, 1−target)·(1−1e-9)`` keeps all values in [0, 1).
    (OWL's own code maps [min r, max r] onto a 2λ-wide interval and re-centres on the mean; that
    can leave the ±λ band for skewed ratios, this form cannot.) Returned in float64; the mean
    (``s.mean()``) is then corrected to equal ``target`` exactly by adjusting the extreme
    layers by a few ulps (which keeps the order). When no float64 sum of ``L`` values has
    ``sum/L == target`` (possible for some ``L``), the closest achievable mean is returned.
    """
    if not isinstance(ratios, Tensor) or ratios.dim() != 1 or ratios.numel() == 0:
        raise StatisticsError("ratios must be a non-empty 1-D tensor (one outlier ratio per layer)")
    check_finite("ratios", ratios)
    target = _check_sparsity(target)
    lam = float(lam)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ConfigError(f"OWL lambda must be >= 0, got {lam!r}")
    r = ratios.to(torch.float64)
    L = r.numel()
    lam_eff = min(lam, target, 1.0 - target) * (1.0 - 1e-9)
    z = r - r.mean()
    zmax = float(z.abs().max())
    a = lam_eff / zmax if zmax > 0 else 0.0
    s = target - a * z
    for _ in range(4):
        if s.mean().item() == target:
            return s
        s = s + (target - s.mean().item())
    return _hit_mean(s, target, max(target - lam, 0.0), min(target + lam, math.nextafter(1.0, 0.0)))


def _hit_mean(s: Tensor, target: float, lo: float, hi: float, tries: int = 32) -> Tensor:
    """Make ``s.mean() == target`` by moving one extreme entry by a whole number of its ulps.

    The computed mean is a monotone step function of any single entry (rounded addition is
    monotone), so a binary search over the ulp offset of one entry finds the exact value when
    that entry can produce it. Entries are tried from the most extreme inward, each capped at its
    more extreme neighbour (so the order of the values is kept) and at ``[lo, hi]``.
    """
    up = s.mean().item() < target
    order = torch.argsort(s, stable=True, descending=up).tolist()
    best, best_err = s.clone(), abs(s.mean().item() - target)
    state = s.clone()  # carries earlier entries moved to just short of the target
    for rank, i in enumerate(order[:tries]):
        base = state.clone()
        v0 = float(base[i])
        cap = (hi if up else lo) if rank == 0 else float(base[order[rank - 1]])
        u = math.ulp(v0) or 5e-324
        k_hi = int(min(abs(cap - v0) / u, 2**40))

        def mean_at(k: int) -> float:
            base[i] = v0 + (k * u if up else -k * u)
            return base.mean().item()

        def reached(m: float) -> bool:
            return m >= target if up else m <= target

        if k_hi <= 0:
            continue
        if not reached(mean_at(k_hi)):
            state = base.clone()  # as far as this entry may go; the next entry continues
            continue
        lo_k, hi_k = 0, k_hi  # smallest k whose mean reaches the target
        while hi_k - lo_k > 1:
            mid = (lo_k + hi_k) // 2
            lo_k, hi_k = (lo_k, mid) if reached(mean_at(mid)) else (mid, hi_k)
        m = mean_at(hi_k)
        if m == target:
            return base
        if abs(m - target) < best_err:
            best, best_err = base.clone(), abs(m - target)
        mean_at(lo_k)
        state = base.clone()
    return best


def sparsity_of(keep: Tensor) -> float:
    """Fraction of pruned entries (False) in a bool keep mask."""
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise StatisticsError(f"keep must be a torch.bool mask, got {getattr(keep, 'dtype', type(keep))}")
    if keep.numel() == 0:
        raise StatisticsError("keep mask is empty")
    return 1.0 - int(keep.sum()) / keep.numel()
