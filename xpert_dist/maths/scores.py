"""Per-entry pruning scores: magnitude, Wanda, ForeSight, and their EMA smoothing.

Pure tensor functions (tensors in, tensors out). Conventions (docs/ARCHITECTURE.md):
weights are ``U[out, in]`` (the *effective* weight ``W + s·B·A`` when a LoRA adapter is
attached), ``d = diag(XᵀX)`` is the raw per-input-column sum of squared activations
(not divided by the token count: every score below is scale-invariant per matrix, so the
normalisation does not change any mask).

Higher score = more important = kept longer. Scores are returned in the dtype of ``U``
(promoted with the statistics' dtype), so callers pick float32/float64 by what they pass in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xpert_dist.errors import StatisticsError

__all__ = [
    "check_finite",
    "magnitude_scores",
    "wanda_scores",
    "foresight_scores",
    "obs_column_factor",
    "ema_scores",
]


def check_finite(name: str, t: Tensor) -> None:
    """Raise :class:`StatisticsError` naming ``name`` if ``t`` holds a NaN or an infinity.

    Why: a single NaN in a statistic or score silently turns a top-k selection into an
    arbitrary mask (NaN compares false with everything), so every entry point checks first.
    """
    if not isinstance(t, Tensor):
        raise StatisticsError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        # fast exact path: a sum is finite only if every entry is (NaN/inf propagate); a non-finite sum
        # may also be an overflow of finite entries, so only then the entrywise test (which allocates
        # temporaries of t's size: 5 GB for a 28,672² fp32 XᵀX)
        if bool(torch.isfinite(t.sum())):
            return
        if not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(1 << 24)):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise StatisticsError(
                f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf) "
                f"in a tensor of shape {tuple(t.shape)}"
            )


def _check_matrix(name: str, U: Tensor) -> None:
    if not isinstance(U, Tensor) or U.dim() != 2:
        shape = tuple(U.shape) if isinstance(U, Tensor) else type(U).__name__
        raise StatisticsError(f"{name} must be a 2-D weight [out, in], got {shape}")
    check_finite(name, U)


def _check_vector(name: str, v: Tensor, length: int, what: str, nonneg: bool = True) -> None:
    if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != length:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise StatisticsError(f"{name} must be a 1-D tensor of length {length} ({what}), got {shape}")
    check_finite(name, v)
    if nonneg and bool((v < 0).any()):
        raise StatisticsError(f"{name} has negative entries (min {float(v.min()):.3g}); it must be >= 0")


def magnitude_scores(U: Tensor) -> Tensor:
    """``|U|``: the data-free magnitude baseline."""
    _check_matrix("U", U)
    return U.abs()


def wanda_scores(U: Tensor, d: Tensor) -> Tensor:
    """Wanda (Sun et al. 2023): ``|U[j,i]| · sqrt(d_i)``, with ``d = diag(XᵀX)``.

    ``sqrt(d_i) = ||X[:, i]||₂`` is the input column norm, so this is the magnitude of the
    output change caused by removing the entry (per token, summed in quadrature).
    """
    _check_matrix("U", U)
    _check_vector("d", d, U.shape[1], "diag(XᵀX) per input column of U")
    dt = torch.promote_types(U.dtype, d.dtype)
    return U.abs().to(dt) * d.to(dt).sqrt()[None, :]


def foresight_scores(U: Tensor, d: Tensor, c: Tensor | None = None) -> Tensor:
    """ForeSight (docs METHOD.md): ``U[j,i]² · d_i · c_j``.

    Zeroing ``U[j,i]`` perturbs output ``j`` by ``X[:, i]·U[j,i]``; the consumer map reads
    output ``j`` through its column ``U₂[:, j]``, so the squared size of the propagated error is
    ``U[j,i]² · ||X[:, i]||² · ||U₂[:, j]||²`` with ``c_j = ||U₂[:, j]||²``
    (see :mod:`xpert_dist.maths.consumers`). ``c=None`` means ``c ≡ 1`` (Wanda squared).
    """
    _check_matrix("U", U)
    _check_vector("d", d, U.shape[1], "diag(XᵀX) per input column of U")
    dt = torch.promote_types(U.dtype, d.dtype)
    s = U.to(dt).square() * d.to(dt)[None, :]
    if c is not None:
        _check_vector("c", c, U.shape[0], "consumer factor per output row of U")
        s = s * c.to(dt)[:, None]
    return s


def obs_column_factor(H: Tensor, percdamp: float = 0.01, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per input column ``i``: ``r_i = 1 / (H_ii · [(H + λI)⁻¹]_ii)`` with ``H = XᵀX`` and SparseGPT's
    damping ``λ = percdamp · mean(diag H)``; ``r_i = 1`` for a dead column (``H_ii = 0``).

    ``U[j,i]² · H_ii`` (ForeSight's and, squared, Wanda's ``d_i``) is the output error of zeroing one
    entry when nothing else moves; ``U[j,i]² / [H⁻¹]_ii`` is the error left when the row's other
    weights re-fit optimally (Optimal Brain Surgeon, Hassibi & Stork 1993), which is what
    ``prune.reconstruct=obs`` then does. Multiplying a ForeSight score by ``r`` turns the first into
    the second (``prune.saliency=obs``). ``0 < r_i <= 1`` (Cauchy-Schwarz); correlated inputs lower it.
    """
    if not isinstance(H, Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise StatisticsError(f"H must be a square [in, in] XᵀX, got {getattr(H, 'shape', type(H))}")
    check_finite("H", H)
    from xpert_dist.maths.sparsegpt import damped_factor

    Uinv, hdiag, dead = damped_factor(H, percdamp, dtype, max_retries=3)  # (H+λI)⁻¹ = UᵀU; dead columns read as 1
    if Uinv is None:
        raise StatisticsError("obs_column_factor: XᵀX is not positive definite even with increased damping")
    return torch.where(dead, torch.ones_like(hdiag), 1.0 / (hdiag * Uinv.square().sum(0)))


def ema_scores(new: Tensor, prev: Tensor | None, eta: float) -> Tensor:
    """Exponential smoothing across prune steps: ``eta·new + (1−eta)·prev``.

    ``prev=None`` (first step) returns ``new`` unchanged; ``eta=1`` disables smoothing.
    Requires ``0 < eta <= 1`` and matching shapes.
    """
    eta = float(eta)
    if not (0.0 < eta <= 1.0):
        raise StatisticsError(f"eta (EMA coefficient) must satisfy 0 < eta <= 1, got {eta}")
    if not isinstance(new, Tensor):
        raise StatisticsError(f"new scores must be a tensor, got {type(new).__name__}")
    check_finite("new scores", new)
    if prev is None:
        return new.clone()
    if not isinstance(prev, Tensor) or prev.shape != new.shape:
        shape = tuple(prev.shape) if isinstance(prev, Tensor) else type(prev).__name__
        raise StatisticsError(
            f"previous scores shape {shape} does not match new scores shape {tuple(new.shape)}"
        )
    check_finite("previous scores", prev)
    dt = torch.promote_types(new.dtype, prev.dtype)
    return eta * new.to(dt) + (1.0 - eta) * prev.to(dt)
