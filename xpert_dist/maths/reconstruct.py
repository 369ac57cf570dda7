"""OBS reconstruction of the kept weights for a GIVEN mask (SparseGPT's update without its mask choice).

``prune.reconstruct=obs``: after a prune step has chosen the keep mask ``M`` (ForeSight, Wanda...),
the kept base weights absorb the pruned ones' contribution to the layer output ``X Wᵀ`` the way
SparseGPT does (Frantar & Alistarh 2023): columns left to right, each pruned weight's error
``(w_q − 0)/[H⁻¹]_qq`` spread over the row's not-yet-processed columns through the upper Cholesky
factor of the damped ``H⁻¹`` (``H = XᵀX``), column blocks of ``blocksize`` with the lazy batch update.
Pruned entries come out exactly 0; kept entries move. With the mask SparseGPT itself would choose,
the result is SparseGPT's (``tests/maths/test_reconstruct.py`` checks exactly that).

Dead inputs (``H_ii == 0``) get ``H_ii = 1`` (no signal: their weights neither carry nor absorb error).
A failed Cholesky (after ``max_retries`` 10× damping increases) returns ``W ⊙ M`` with a warning.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.scores import check_finite
from xpert_dist.maths.sparsegpt import _hinv_chol

__all__ = ["obs_reconstruct"]


def obs_reconstruct(W: Tensor, H: Tensor, keep: Tensor, *, blocksize: int = 128, percdamp: float = 0.01,
                    dtype: torch.dtype = torch.float64, max_retries: int = 3) -> Tensor:
    """Kept weights updated so that ``X (W_new)ᵀ ≈ X Wᵀ`` with ``W_new`` zero off ``keep``; returns
    ``W_new`` in ``W``'s dtype."""
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise StatisticsError(f"W must be a 2-D weight [out, in], got {getattr(W, 'shape', type(W))}")
    rows, cols = W.shape
    if not isinstance(H, Tensor) or tuple(H.shape) != (cols, cols):
        raise StatisticsError(f"H must be [in, in] = [{cols}, {cols}], got {getattr(H, 'shape', type(H))}")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != W.shape:
        raise StatisticsError(f"keep must be a bool mask of W's shape {tuple(W.shape)}")
    check_finite("W", W)
    check_finite("H", H)
    if int(blocksize) <= 0:
        raise ConfigError(f"blocksize must be positive, got {blocksize}")
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    Wc = W.detach().to(dtype).clone()
    hdiag = H.diagonal().to(dtype).clone()
    dead = hdiag == 0
    hdiag[dead] = 1.0
    damp = float(percdamp) * abs(float(hdiag.mean()))
    Hinv = _hinv_chol(H, dead, dtype, damp, max_retries)  # SparseGPT's factor, same damping
    if Hinv is None:
        warnings.warn("obs_reconstruct: Cholesky failed even with increased damping; kept weights not updated",
                      RuntimeWarning, stacklevel=2)
        return (Wc * keep).to(W.dtype)
    pruned = ~keep
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wc[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        P1 = pruned[:, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(P1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        Wc[:, i1:i2] = W1
        if i2 < cols:
            Wc[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Wc[pruned] = 0.0
    return Wc.to(W.dtype)
