"""SparseGPT: reconstruction quality vs Wanda/magnitude, exact counts, N:M, dead columns, failures."""

from __future__ import annotations

import warnings

import pytest
import torch

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.masks import select_mask
from xpert_dist.maths.scores import magnitude_scores, wanda_scores
from xpert_dist.maths.sparsegpt import sparsegpt_prune


def _layer(out_f=16, in_f=48, n=400, seed=0):
    """Correlated, heterogeneous-scale inputs: X = Z·Mix·diag(scale)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, dtype=torch.float64, generator=g) / in_f ** 0.5
    mix = mix + 0.5 * torch.randn(1, in_f, dtype=torch.float64, generator=g)  # shared component
    scale = torch.exp(torch.randn(in_f, dtype=torch.float64, generator=g))
    X = torch.randn(n, in_f, dtype=torch.float64, generator=g) @ mix * scale
    W = torch.randn(out_f, in_f, dtype=torch.float64, generator=g)
    return W, X


def _err(X, W, Wh):
    return float((X @ (W - Wh).t()).square().sum())


def test_sparsegpt_beats_wanda_beats_magnitude():
    W, X = _layer()
    H = X.t() @ X
    s = 0.5
    Wsg, keep = sparsegpt_prune(W, H, s, blocksize=16)
    k_w = select_mask(wanda_scores(W, H.diagonal()), s, "output")
    k_m = select_mask(magnitude_scores(W), s, "output")
    assert int((~keep).sum()) == int((~k_w).sum()) == int((~k_m).sum()) == round(s * W.numel())
    e_sg, e_w, e_m = _err(X, W, Wsg), _err(X, W, W * k_w), _err(X, W, W * k_m)
    assert e_sg < e_w < e_m
    assert e_sg < 0.7 * e_w  # the updates are worth a lot on correlated inputs


@pytest.mark.parametrize("shape,s,bs", [((7, 45), 0.37, 16), ((5, 33), 0.5, 7), ((3, 10), 0.9, 128), ((4, 12), 0.0, 4)])
def test_exact_unstructured_count(shape, s, bs):
    W, X = _layer(*shape, n=60, seed=shape[1])
    Wn, keep = sparsegpt_prune(W, X.t() @ X, s, blocksize=bs)
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert int((~keep).sum()) == round(s * W.numel())
    assert torch.all(Wn[~keep] == 0)
    assert Wn.dtype == W.dtype and torch.isfinite(Wn).all()
    if s == 0.0:
        assert torch.equal(Wn, W) and bool(keep.all())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm(n, m):
    W, X = _layer(6, 32, n=80, seed=m)
    Wn, keep = sparsegpt_prune(W, X.t() @ X, 0.0, pattern=(n, m), blocksize=16)
    assert torch.all(keep.reshape(6, -1, m).sum(-1) == n)
    assert torch.all(Wn[~keep] == 0)
    # N:M with updates must still beat the no-update N:M mask of the same scores
    from xpert_dist.maths.masks import nm_mask

    kw = nm_mask(wanda_scores(W, (X.t() @ X).diagonal()), n, m)
    assert _err(X, W, Wn) < _err(X, W, W * kw)


def test_dead_columns():
    W, X = _layer(5, 20, n=50, seed=4)
    X[:, [3, 11]] = 0.0
    H = X.t() @ X
    Wn, keep = sparsegpt_prune(W, H, 0.4, blocksize=8)
    assert torch.isfinite(Wn).all()
    assert torch.all(Wn[:, [3, 11]] == 0)
    assert int((~keep).sum()) == round(0.4 * W.numel())
    assert bool((~keep[:, [3, 11]]).all())  # zero-signal entries are the first to go
    assert torch.equal(H, X.t() @ X)  # input statistics not modified


def test_float32_option_close_to_float64():
    W, X = _layer(6, 24, n=60, seed=9)
    H = X.t() @ X
    W64, k64 = sparsegpt_prune(W, H, 0.5, blocksize=8)
    W32, k32 = sparsegpt_prune(W.float(), H.float(), 0.5, blocksize=8, dtype=torch.float32)
    assert W32.dtype == torch.float32 and int((~k32).sum()) == int((~k64).sum())
    assert (k32 == k64).float().mean() > 0.95


def test_cholesky_failure_once_retries(monkeypatch):
    W, X = _layer(4, 16, n=40, seed=2)
    real = torch.linalg.cholesky
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("simulated failure")
        return real(*a, **k)

    monkeypatch.setattr(torch.linalg, "cholesky", flaky)
    with pytest.warns(RuntimeWarning, match="Cholesky.*retrying with 10x damping"):
        Wn, keep = sparsegpt_prune(W, X.t() @ X, 0.5, blocksize=8)
    assert int((~keep).sum()) == 32 and torch.all(Wn[~keep] == 0)


def test_indefinite_hessian_recovers_with_damping():
    W = torch.randn(3, 8, dtype=torch.float64)
    H = torch.eye(8, dtype=torch.float64) + 1.5 * (torch.ones(8, 8, dtype=torch.float64) - torch.eye(8))
    H[0, 1] = H[1, 0] = -3.0  # positive diagonal, negative eigenvalues
    assert torch.linalg.eigvalsh(H).min() < 0
    with pytest.warns(RuntimeWarning, match="Cholesky"):
        Wn, keep = sparsegpt_prune(W, H, 0.5, percdamp=0.01)
    assert int((~keep).sum()) == 12 and torch.all(Wn[~keep] == 0) and torch.isfinite(Wn).all()


def test_cholesky_always_fails_falls_back(monkeypatch):
    W, X = _layer(4, 16, n=40, seed=3)

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "cholesky", broken)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        Wn, keep = sparsegpt_prune(W, X.t() @ X, 0.3, pattern=None)
    msgs = [str(w.message) for w in rec]
    assert sum("retrying" in m for m in msgs) == 3 and any("falling back" in m for m in msgs)
    assert int((~keep).sum()) == round(0.3 * 64)
    assert torch.equal(Wn, W * keep)  # no update in the fallback
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        Wn, keep = sparsegpt_prune(W, X.t() @ X, 0.0, pattern=(2, 4))
    assert any("falling back" in str(w.message) for w in rec)
    assert torch.all(keep.reshape(4, -1, 4).sum(-1) == 2)


def test_errors():
    W, X = _layer(4, 16, n=20)
    H = X.t() @ X
    Hn = H.clone()
    Hn[2, 3] = float("nan")
    with pytest.raises(StatisticsError, match="H"):
        sparsegpt_prune(W, Hn, 0.5)
    with pytest.raises(StatisticsError, match="H must be"):
        sparsegpt_prune(W, H[:8, :8], 0.5)
    with pytest.raises(ConfigError, match="sparsity"):
        sparsegpt_prune(W, H, 1.0)
    with pytest.raises(ConfigError, match="divisible"):
        sparsegpt_prune(W[:, :15], H[:15, :15], 0.5, pattern=(2, 4))
    with pytest.raises(ConfigError, match="0 < n < m"):
        sparsegpt_prune(W, H, 0.5, pattern=(4, 4))


def test_lazy_block_updates_are_exact():
    """Column blocks only batch the updates: for N:M (mask chosen column-group by column-group)
    the result cannot depend on the block size."""
    W, X = _layer(5, 32, n=80, seed=11)
    H = X.t() @ X
    a, ka = sparsegpt_prune(W, H, 0.0, pattern=(2, 4), blocksize=4)
    b, kb = sparsegpt_prune(W, H, 0.0, pattern=(2, 4), blocksize=32)
    assert torch.equal(ka, kb)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
