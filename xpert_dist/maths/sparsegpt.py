"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with column blocks and weight updates.

Given ``W[out, in]`` and ``H = XᵀX`` (``in × in``) of its calibration inputs, prune columns
left to right: each pruned weight's error is spread over the not-yet-processed columns of its
row through the upper Cholesky factor of ``H⁻¹`` (the OBS update ``δ = −w_q/[H⁻¹]_qq · H⁻¹ e_q``
restricted to the remaining columns), so the layer output ``X Wᵀ`` changes as little as the
sequential scheme allows.

Project specifics:

* damping ``percdamp · mean(diag H)`` on the diagonal; dead inputs (``H_ii == 0``) get
  ``H_ii = 1`` and ``W[:, i] = 0`` (they carry no signal; their entries become free prunes);
* unstructured: the mask of each column block is chosen by ``W²/diag(Hinv_chol)²`` over the
  whole block (ties: lower row-major index first), with the block's count set to the running
  target ``round(s·rows·cols_done) − pruned_so_far``, so the matrix loses exactly
  ``round(s·numel)`` entries (:func:`masks.prune_count`);
* N:M (``pattern=(n, m)``: keep ``n`` of every ``m`` inputs), chosen at each group's first
  column as in the reference code;
* a failed Cholesky warns and retries with 10× damping (up to ``max_retries`` times), then falls
  back to a diagonal, no-update mask (scores ``W² · diag(H)``, Wanda-like) with a warning;
* computation in float64 by default (``dtype=torch.float32`` to save memory); the result is
  returned in ``W``'s dtype with pruned entries exactly 0.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.masks import _check_nm, _check_sparsity, nm_mask, prune_count, select_mask
from xpert_dist.maths.scores import check_finite

__all__ = ["sparsegpt_prune"]


def _hinv_chol(H: Tensor, dead: Tensor, dtype: torch.dtype, damp: float, max_retries: int) -> Tensor | None:
    """Upper Cholesky factor of ``(H' + damp·I)⁻¹`` (``H'``: ``H`` in ``dtype`` with dead diagonals
    set to 1); 10× damping per retry; None if all fail.

    Memory: at most two ``in × in`` matrices live besides the caller's ``H`` (the damped copy, then
    the factor, then ``H⁻¹``, then its factor; each freed as soon as the next exists). The damping
    is added to the copy's diagonal in place (no identity matrix, no ``H + damp·I`` temporary).
    """
    for attempt in range(max_retries + 1):
        try:
            Hd = H.detach().to(dtype, copy=True)
            Hd[dead, dead] = 1.0
            Hd.diagonal().add_(damp)
            L = torch.linalg.cholesky(Hd)
            del Hd
            Hinv = torch.cholesky_inverse(L)
            del L
            U = torch.linalg.cholesky(Hinv, upper=True)
            del Hinv
            if bool(torch.isfinite(U).all()):
                return U
            del U
            raise RuntimeError("non-finite Cholesky factor")
        except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
            reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}"
            if attempt == max_retries:
                break
            warnings.warn(
                f"sparsegpt: Cholesky of the damped Hessian failed ({reason}); retrying with 10x damping "
                f"({damp:.3g} -> {10 * damp:.3g})",
                RuntimeWarning,
                stacklevel=3,
            )
            damp = 10.0 * damp if damp > 0 else 1e-8 * float(H.diagonal().to(dtype).masked_fill(dead, 1.0).abs().mean() + 1.0)
    return None


def damped_factor(H: Tensor, percdamp: float, dtype: torch.dtype, max_retries: int
                  ) -> tuple[Tensor | None, Tensor, Tensor]:
    """SparseGPT's damping and factor, shared by every OBS solve here (this module's, ``maths/reconstruct``'s
    and ``scores.obs_column_factor``): ``(U, hdiag, dead)`` with ``dead = H_ii == 0``, ``hdiag`` the diagonal
    in ``dtype`` with dead entries set to 1, and ``U`` the upper Cholesky factor of the damped ``H⁻¹``
    (damping ``percdamp · mean(hdiag)``; None if it fails even after ``max_retries`` 10× increases)."""
    hdiag = H.diagonal().to(dtype, copy=True)  # no full copy of H here: _hinv_chol makes the one it needs
    dead = hdiag == 0
    hdiag[dead] = 1.0
    damp = float(percdamp) * abs(float(hdiag.mean()))
    return _hinv_chol(H, dead, dtype, damp, max_retries), hdiag, dead


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float64,
    max_retries: int = 3,
) -> tuple[Tensor, Tensor]:
    """Prune ``W`` with SparseGPT; returns ``(W_new, keep)`` (keep: bool, True = kept).

    ``sparsity`` in [0, 1) applies to unstructured pruning; with ``pattern=(n, m)`` the mask is
    N:M (``sparsity`` is then ignored except for validation). ``H = XᵀX`` is not modified.
    """
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise StatisticsError(f"W must be a 2-D weight [out, in], got {getattr(W, 'shape', type(W))}")
    rows, cols = W.shape
    if not isinstance(H, Tensor) or tuple(H.shape) != (cols, cols):
        raise StatisticsError(f"H must be [in, in] = [{cols}, {cols}], got {getattr(H, 'shape', type(H))}")
    check_finite("W", W)
    check_finite("H", H)
    s = _check_sparsity(sparsity)
    if pattern is not None:
        n_keep, m = _check_nm(*pattern)
        if cols % m:
            raise ConfigError(f"N:M pattern {n_keep}:{m} needs the input size ({cols}) divisible by m={m}")
        if blocksize % m:
            raise ConfigError(f"blocksize ({blocksize}) must be a multiple of m={m} for N:M pruning")
    if int(blocksize) <= 0:
        raise ConfigError(f"blocksize must be positive, got {blocksize}")
    if not (float(percdamp) >= 0):
        raise ConfigError(f"percdamp must be >= 0, got {percdamp}")
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

    out_dtype = W.dtype
    Wc = W.detach().to(dtype, copy=True)
    Hinv, hdiag, dead = damped_factor(H, percdamp, dtype, max_retries)
    Wc[:, dead] = 0.0
    if Hinv is None:
        warnings.warn(
            "sparsegpt: Cholesky failed even with increased damping; falling back to a diagonal "
            "(no-update, Wanda-like) mask with scores W^2 * diag(H)",
            RuntimeWarning,
            stacklevel=2,
        )
        scores = Wc.square() * hdiag.abs()[None, :]
        keep = nm_mask(scores, *pattern) if pattern is not None else select_mask(scores, s, "layer")
        return (Wc * keep).to(out_dtype), keep

    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wc[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        dH = Hinv1.diagonal()
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            k_block = prune_count(s, rows * i2) - pruned_so_far
            k_block = max(0, min(k_block, W1.numel()))
            if k_block > 0:
                tmp = (W1.square() / dH.square()[None, :]).reshape(-1)
                idx = torch.sort(tmp, stable=True).indices[:k_block]
                prune1.view(-1)[idx] = True
            pruned_so_far += k_block
        for i in range(count):
            w = W1[:, i]
            d = dH[i]
            if pattern is not None and i % m == 0:
                tmp = W1[:, i:i + m].square() / dH[i:i + m].square()[None, :]
                prune1[:, i:i + m] = ~nm_mask(tmp, n_keep, m)
            q = w.clone()
            q[prune1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Wc[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        if i2 < cols:
            Wc[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Wc[~keep] = 0.0
    return Wc.to(out_dtype), keep
