"""OBS reconstruction of the kept weights for a given mask (prune.reconstruct=obs)."""
import pytest
import torch

from xpert_dist.errors import StatisticsError
from xpert_dist.maths.masks import select_mask
from xpert_dist.maths.reconstruct import obs_factor, obs_reconstruct
from xpert_dist.maths.scores import wanda_scores
from xpert_dist.maths.sparsegpt import sparsegpt_prune


def _problem(seed, out=12, n_in=40, n=200):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n_in, dtype=torch.float64, generator=g)
    X = torch.randn(n, n_in, dtype=torch.float64, generator=g) @ (torch.eye(n_in, dtype=torch.float64)
                                                                  + 0.3 * torch.randn(n_in, n_in, dtype=torch.float64,
                                                                                      generator=g))
    return W, X, X.t() @ X


@pytest.mark.parametrize("blocksize", [8, 16, 128])
def test_with_sparsegpts_own_mask_it_is_sparsegpt(blocksize):
    """Oracle: SparseGPT (maths/sparsegpt.py) chooses a mask and updates; given that mask the
    reconstruction reproduces its weights."""
    W, X, H = _problem(0)
    want, keep = sparsegpt_prune(W, H, 0.5, blocksize=blocksize, percdamp=0.01)
    got = obs_reconstruct(W, H, keep, blocksize=blocksize, percdamp=0.01)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def _naive_sequential_obs(W, H, keep, percdamp=0.01):
    """Textbook sequential OBS, one row and one column at a time with an explicit inverse of the
    remaining columns' damped Hessian (no Cholesky trick, no blocks): column q is set to its target
    (0 if pruned) and the change is spread over columns q+1.. by −δ·[H_F⁻¹]_{q,:}/[H_F⁻¹]_qq."""
    Hd = H + percdamp * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype)
    out = W.clone()
    n = W.shape[1]
    for j in range(W.shape[0]):
        w = out[j]
        for q in range(n):
            if keep[j, q]:
                continue
            Hinv = torch.linalg.inv(Hd[q:, q:])
            w[q:] -= w[q] / Hinv[0, 0] * Hinv[0, :]
            w[q] = 0.0
    return out


@pytest.mark.parametrize("blocksize", [5, 128])
def test_given_a_wanda_mask_it_is_sequential_obs(blocksize):
    """Oracle: the naive float64 sequential OBS; pruned entries exactly 0, every kept one kept."""
    W, X, H = _problem(1)
    keep = select_mask(wanda_scores(W, X.square().sum(0)), 0.5, "output")
    got = obs_reconstruct(W, H, keep, blocksize=blocksize)
    torch.testing.assert_close(got, _naive_sequential_obs(W, H, keep), rtol=0, atol=1e-9)
    assert bool((got[~keep] == 0).all()) and bool((got[keep] != 0).all())


def test_a_factor_shared_by_modules_that_read_one_input():
    """Two modules reading the same input (q/k, gate/up) take one obs_factor; each result is the naive
    float64 sequential OBS, in float64 and (to float32 rounding) in float32; a dead input column
    (H_ii = 0) gets no error and keeps its kept weights."""
    W, X, H = _problem(3, out=10)
    X[:, 7] = 0.0
    H = X.t() @ X
    V = torch.randn(6, W.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        factor = obs_factor(H, dtype=dtype)
        for M in (W, V):
            keep = select_mask(wanda_scores(M, X.square().sum(0)), 0.4, "output")
            Hn = H.clone()
            Hn[7, 7] = 1.0  # the oracle's view of a dead input: no signal, unit diagonal
            want = _naive_sequential_obs(M, Hn, keep)
            got = obs_reconstruct(M, H, keep, dtype=dtype, factor=factor)
            torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))
            assert bool((got[~keep] == 0).all())
            kept7 = keep[:, 7]
            assert torch.equal(got[kept7, 7], M[kept7, 7].to(dtype).to(M.dtype))  # the dead column absorbs nothing


def test_bad_mask_shape():
    W, X, H = _problem(2)
    with pytest.raises(StatisticsError, match="keep"):
        obs_reconstruct(W, H, torch.ones(3, 3, dtype=torch.bool))


def test_carry_hessian_hand_computed():
    from xpert_dist.maths.reconstruct import carry_hessian

    H = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    prev = torch.tensor([[4.0, 0.0], [0.0, 8.0]])
    torch.testing.assert_close(carry_hessian(H, prev, 0.5), torch.tensor([[4.0, 1.0], [1.0, 7.0]]))
    assert carry_hessian(H, None, 0.5) is H and carry_hessian(H, prev, 0.0) is H
    with pytest.raises(StatisticsError, match="shape"):
        carry_hessian(H, torch.zeros(3, 3), 1.0)
