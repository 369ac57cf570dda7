"""The cheaper solver paths (for 70B widths) pinned to the previous formulas on small shapes.

* ``pbs_full(support="dense")`` computes ``A·H`` first (``r·in²`` flops) instead of ``(U⊙P)·H``
  (``out·in²``); the previous expression is recomputed here in float64 as the oracle.
* PBS's symmetry check compares tiles (no full ``H − Hᵀ`` temporary);
* ``check_finite`` decides from the sum first (exact: a non-finite sum falls back to the entrywise test).
* SparseGPT's ``H⁻¹`` Cholesky factor is built from one private copy with the damping added in place
  (no identity, no ``H + damp·I``); the previous ``cholesky(cholesky_inverse(cholesky(H + damp·I)))``
  is the oracle, and must match bit for bit (same matrix into the same LAPACK calls).
"""
from __future__ import annotations

import pytest
import torch

from xpert_dist.errors import StatisticsError
from xpert_dist.maths import pbs as pbs_mod
from xpert_dist.maths import sparsegpt as sg
from xpert_dist.maths.masks import select_mask
from xpert_dist.maths.scores import wanda_scores


def _problem(out_f, in_f, r=4, n=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(out_f, in_f, dtype=dtype, generator=g)
    A = torch.randn(r, in_f, dtype=dtype, generator=g) / in_f ** 0.5
    X = torch.randn(n * in_f, in_f, dtype=dtype, generator=g) @ torch.randn(in_f, in_f, dtype=dtype, generator=g)
    H = X.t() @ X
    H = 0.5 * (H + H.t())
    keep = select_mask(wanda_scores(U, H.diagonal()), 0.5, "output")
    return U, A, keep, H


def _old_dense(U, A, keep, H, s, lam):
    """The previous pbs_full dense path, verbatim in float64."""
    U, A, H = U.double(), A.double(), H.double()
    lam_e = lam * s * s * float((A.square() * H.diagonal()[None, :]).sum(1).mean())
    Hu = (U * (~keep).double()) @ H
    G = s * s * (A @ H @ A.t()) + lam_e * torch.eye(A.shape[0], dtype=torch.float64)
    return torch.linalg.solve(G, (s * (Hu @ A.t())).t()).t()


@pytest.mark.parametrize("shape", [(7, 24), (40, 16), (5, 96)])
@pytest.mark.parametrize("lam", [1e-8, 1e-2])
def test_pbs_full_dense_reassociated_matches_previous_formula(shape, lam):
    U, A, keep, H = _problem(*shape, seed=shape[0])
    got = pbs_mod.pbs_full(U, A, keep, H, 2.0, lam=lam, support="dense")
    ref = _old_dense(U, A, keep, H, 2.0, lam)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    got32 = pbs_mod.pbs_full(U.float(), A.float(), keep, H.float(), 2.0, lam=lam, support="dense")
    assert got32.dtype == torch.float32
    assert torch.allclose(got32.double(), ref, rtol=2e-3, atol=2e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("block", [3, 7, 50, 512])
def test_tiled_symmetry_check_matches_dense_check(block):
    _, _, _, H = _problem(4, 50, seed=3)
    assert pbs_mod._is_symmetric(H, block=block)
    tol = 1e-6 * float(H.abs().max())
    for i, j, eps in ((3, 41, 3.0), (49, 0, 3.0), (10, 11, 0.5), (48, 49, 2.0), (0, 1, 0.9)):  # above / below tol
        B = H.clone()
        B[i, j] += eps * tol
        dense = float((B - B.t()).abs().max()) <= tol
        assert pbs_mod._is_symmetric(B, block=block) == dense
    U, A, keep, _ = _problem(4, 50, seed=3)
    B = H.clone()
    B[3, 41] += 3.0 * tol
    with pytest.raises(StatisticsError, match="symmetric"):
        pbs_mod.pbs_full(U, A, keep, B, 2.0)


def _old_hinv_chol(H, damp):
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    L = torch.linalg.cholesky(H + damp * eye)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparsegpt_hinv_factor_is_bitwise_the_previous_one(dtype):
    _, _, _, H = _problem(3, 64, seed=5)
    H[7, :] = 0.0
    H[:, 7] = 0.0  # a dead input
    dead = H.diagonal() == 0
    Hc = H.to(dtype).clone()
    Hc[dead, dead] = 1.0
    damp = 0.01 * float(Hc.diagonal().mean())
    before = H.clone()
    got = sg._hinv_chol(H, dead, dtype, damp, max_retries=3)
    assert torch.equal(H, before)  # the caller's H is not modified
    assert got.dtype == dtype and torch.equal(got, _old_hinv_chol(Hc, damp))


def test_sparsegpt_prune_float32_close_to_float64():
    """The solver dtype the pipeline uses (prune.solver_dtype=float32) against the float64 path."""
    U, _, _, H = _problem(16, 64, seed=9)
    W64, k64 = sg.sparsegpt_prune(U, H, 0.5, blocksize=16, dtype=torch.float64)
    W32, k32 = sg.sparsegpt_prune(U.float(), H.float(), 0.5, blocksize=16, dtype=torch.float32)
    assert int((~k32).sum()) == int((~k64).sum()) == 16 * 64 // 2
    agree = float((k32 == k64).double().mean())
    assert agree > 0.97
    both = k32 & k64
    assert torch.allclose(W32.double()[both], W64[both], rtol=1e-2, atol=1e-3 * float(W64.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_check_finite_fast_path_is_exact(dtype):
    from xpert_dist.maths.scores import check_finite

    big = torch.finfo(dtype).max / 2
    check_finite("x", torch.full((5, 3), big, dtype=dtype))  # finite entries whose sum overflows: no error
    check_finite("x", torch.randn(4, 4).to(dtype))
    for bad, counts in ((float("nan"), "1 NaN, 0 inf"), (float("inf"), "0 NaN, 1 inf"), (-float("inf"), "0 NaN, 1 inf")):
        t = torch.full((5, 3), big, dtype=dtype)
        t[4, 2] = bad
        with pytest.raises(StatisticsError, match=counts):
            check_finite("x", t)
    t = torch.zeros(6, dtype=dtype)
    t[1], t[4] = float("inf"), -float("inf")  # the sum is NaN, the entries are two infinities
    with pytest.raises(StatisticsError, match="0 NaN, 2 inf"):
        check_finite("x", t)
    check_finite("x", torch.zeros(0, dtype=dtype))
