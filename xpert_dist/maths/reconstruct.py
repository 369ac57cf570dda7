"""OBS reconstruction of the kept weights for a GIVEN mask (SparseGPT's update without its mask choice).

``prune.reconstruct=obs``: after a prune step has chosen the keep mask ``M`` (ForeSight, Wanda...),
the kept base weights absorb the pruned ones' contribution to the layer output ``X Wᵀ`` the way
SparseGPT does (Frantar & Alistarh 2023): columns left to right, each pruned weight's error
``e_q = w_q/[U]_qq`` spread over the row's not-yet-processed columns through the upper Cholesky
factor ``U`` of the damped ``H⁻¹`` (``H = XᵀX``): ``w ← w − e_q·U[q, :]``. Pruned entries come out
exactly 0; kept entries move. With the mask SparseGPT itself would choose, the result is SparseGPT's
(``tests/maths/test_reconstruct.py`` checks exactly that).

Because the mask is given, the column sweep needs no Python loop over columns. Within a block of
columns the errors ``E`` of one row solve a triangular system: ``E_P · U_PP = W_P`` on the row's
pruned columns ``P`` (``E = 0`` on kept ones), after which ``W ← W − E·U[block, block:]``. Every row
of a block is solved at once as a batch of triangular systems (rows in chunks, so the batch stays
below ``_BATCH_ELEMENTS`` entries), and the later columns get the lazy batch update of SparseGPT.
The arithmetic is the sweep's; the cost moves from Python to batched solves of ``b × b`` systems, so
small blocks win (``bench/results/obs_speed.md``, one SmolLM2-135M block, float32, 1 thread: 1.7× faster
than the sweep at the default ``blocksize=32`` with the factor shared per input, slower than the sweep at
128). The block size changes only rounding here (the mask is given), unlike SparseGPT's own; 32, not the
fastest 16, because with 16 the float32 rounding let a single process and ZeRO-3 drift apart by 1.5% in
perplexity on ``tests/train/test_zero3_real.py``'s ill-conditioned calibration (bound 1%; 32 and 128 pass).

Dead inputs (``H_ii == 0``) get ``H_ii = 1`` (no signal: their weights neither carry nor absorb error).
A failed Cholesky (after ``max_retries`` 10× damping increases) returns ``W ⊙ M`` with a warning.
Modules that share an input (q/k/v, gate/up) share ``H`` and so the factor: :func:`obs_factor`
computes it once and ``obs_reconstruct(..., factor=)`` takes it.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.scores import check_finite
from xpert_dist.maths.sparsegpt import damped_factor

__all__ = ["carry_hessian", "obs_factor", "obs_reconstruct"]

_BATCH_ELEMENTS = 1 << 22  # entries of the batched triangular matrices of one row chunk (32 MiB in float64)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def obs_factor(H: Tensor, *, percdamp: float = 0.01, dtype: torch.dtype = torch.float64,
               max_retries: int = 3) -> Tensor | None:
    """Upper Cholesky factor of the damped ``H⁻¹`` (dead inputs set to 1, ``percdamp``·mean diagonal
    added), in ``dtype``; None if the Cholesky fails even with ``max_retries`` 10× damping increases."""
    check_finite("H", H)
    _check_dtype(dtype)
    return damped_factor(H, percdamp, dtype, max_retries)[0]


def carry_hessian(H: Tensor, previous: Tensor | None, carry: float) -> Tensor:
    """``H + carry·previous`` (``H`` when there is no previous step or ``carry`` is 0): this prune step's
    ``XᵀX`` plus the decayed running sum of the earlier steps' (``prune.hessian_carry``). The OBS update
    depends on ``H`` only up to scale (damping is relative to its mean diagonal), so with ``carry=1`` and
    equal token counts this is the ``XᵀX`` of every step's windows together."""
    if previous is None or carry == 0:
        return H
    if tuple(previous.shape) != tuple(H.shape):
        raise StatisticsError(f"carried XᵀX has shape {tuple(previous.shape)}, this step's {tuple(H.shape)}")
    check_finite("carried H", previous)
    return H + carry * previous.to(device=H.device, dtype=H.dtype)


def _block_errors(W1: Tensor, pruned: Tensor, U1: Tensor) -> Tensor:
    """Per row: ``E`` zero on kept columns and ``E_P · U1_PP = W1_P`` on the pruned ones (``U1`` upper
    triangular), solved for all rows as batches of triangular systems."""
    rows, b = W1.shape
    E = torch.empty_like(W1)
    chunk = max(1, _BATCH_ELEMENTS // (b * b))
    for r0 in range(0, rows, chunk):
        p = pruned[r0:r0 + chunk].to(W1.dtype)
        M = U1[None] * (p[:, :, None] * p[:, None, :])  # U1 restricted to the row's pruned columns ...
        M.diagonal(dim1=1, dim2=2).add_(1.0 - p)  # ... and the identity on its kept ones
        rhs = (W1[r0:r0 + chunk] * p)[:, None, :]
        E[r0:r0 + chunk] = torch.linalg.solve_triangular(M, rhs, upper=True, left=False)[:, 0, :]
    return E


def obs_reconstruct(W: Tensor, H: Tensor, keep: Tensor, *, blocksize: int = 32, percdamp: float = 0.01,
                    dtype: torch.dtype = torch.float64, max_retries: int = 3,
                    factor: Tensor | None = None) -> Tensor:
    """Kept weights updated so that ``X (W_new)ᵀ ≈ X Wᵀ`` with ``W_new`` zero off ``keep``; returns
    ``W_new`` in ``W``'s dtype. ``factor``: :func:`obs_factor` of ``H`` with the same settings,
    when the caller already has it (computed here otherwise)."""
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise StatisticsError(f"W must be a 2-D weight [out, in], got {getattr(W, 'shape', type(W))}")
    rows, cols = W.shape
    if not isinstance(H, Tensor) or tuple(H.shape) != (cols, cols):
        raise StatisticsError(f"H must be [in, in] = [{cols}, {cols}], got {getattr(H, 'shape', type(H))}")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != W.shape:
        raise StatisticsError(f"keep must be a bool mask of W's shape {tuple(W.shape)}")
    check_finite("W", W)
    if int(blocksize) <= 0:
        raise ConfigError(f"blocksize must be positive, got {blocksize}")
    _check_dtype(dtype)
    Hinv = obs_factor(H, percdamp=percdamp, dtype=dtype, max_retries=max_retries) if factor is None \
        else factor.to(dtype)
    Wc = W.detach().to(dtype).clone()
    if Hinv is None:
        warnings.warn("obs_reconstruct: Cholesky failed even with increased damping; kept weights not updated",
                      RuntimeWarning, stacklevel=2)
        return (Wc * keep).to(W.dtype)
    pruned = ~keep
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        E = _block_errors(Wc[:, i1:i2], pruned[:, i1:i2], Hinv[i1:i2, i1:i2])
        Wc[:, i1:] -= E @ Hinv[i1:i2, i1:]  # the block itself and the lazy update of the later columns
    Wc[pruned] = 0.0
    return Wc.to(W.dtype)
