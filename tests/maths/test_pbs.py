"""Partial Brain Surgeon against explicitly stacked least-squares problems (torch.linalg.lstsq)."""

from __future__ import annotations

import pytest
import torch

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.masks import select_mask
from xpert_dist.maths.pbs import pbs_diagonal, pbs_full, pbs_objective, pbs_shared_gram
from xpert_dist.maths.scores import wanda_scores

OUT, IN, R, N = 6, 20, 3, 50
SCALE = 2.0


def _problem(seed=0, sparsity=0.5, correlated=True):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(OUT, IN, dtype=torch.float64, generator=g)
    A = torch.randn(R, IN, dtype=torch.float64, generator=g) / IN ** 0.5
    Z = torch.randn(N, IN, dtype=torch.float64, generator=g)
    if correlated:
        mix = torch.randn(IN, IN, dtype=torch.float64, generator=g) / IN ** 0.5
        mix = mix + 0.6 * torch.randn(1, IN, dtype=torch.float64, generator=g)
        Z = Z @ mix
    X = Z * torch.exp(0.5 * torch.randn(IN, dtype=torch.float64, generator=g))
    d = X.square().sum(0)
    keep = select_mask(wanda_scores(U, d), sparsity, "output")
    return U, A, keep, X


def _lam_eff(lam, A, dvec):
    return lam * SCALE ** 2 * float((A.square() * dvec[None, :]).sum(1).mean())


def _diag_oracle(U, A, keep, d, kappa, lam):
    lam_e = _lam_eff(lam, A, d)
    rows = []
    for j in range(U.shape[0]):
        P = ~keep[j]
        w = torch.where(P, d, kappa * d).sqrt()
        design = torch.cat([(w[:, None] * SCALE * A.t()), (lam_e ** 0.5) * torch.eye(R, dtype=torch.float64)])
        target = torch.cat([torch.where(P, d.sqrt() * U[j], torch.zeros_like(d)), torch.zeros(R, dtype=torch.float64)])
        rows.append(torch.linalg.lstsq(design, target[:, None]).solution[:, 0])
    return torch.stack(rows)


def _full_oracle(U, A, keep, X, lam, support):
    lam_e = _lam_eff(lam, A, X.square().sum(0))
    rows = []
    for j in range(U.shape[0]):
        m = keep[j].to(torch.float64)
        Aj = A * m[None, :] if support == "kept" else A
        design = torch.cat([SCALE * X @ Aj.t(), (lam_e ** 0.5) * torch.eye(R, dtype=torch.float64)])
        target = torch.cat([X @ (U[j] * (1 - m)), torch.zeros(R, dtype=torch.float64)])
        rows.append(torch.linalg.lstsq(design, target[:, None]).solution[:, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("lam", [1e-8, 1e-2])
def test_diagonal_equals_lstsq(kappa, lam):
    U, A, keep, X = _problem(seed=1)
    d = X.square().sum(0)
    got = pbs_diagonal(U, A, keep, d, SCALE, kappa=kappa, lam=lam, row_chunk=4)
    assert torch.allclose(got, _diag_oracle(U, A, keep, d, kappa, lam), rtol=1e-8, atol=1e-10)
    obj = pbs_objective(U, A, keep, d, SCALE, got, kappa=kappa, lam=lam)
    none = pbs_objective(U, A, keep, d, SCALE, torch.zeros_like(got), kappa=kappa, lam=lam)
    assert bool((obj <= none + 1e-12).all()) and bool((obj < none).any())


@pytest.mark.parametrize("support", ["dense", "kept"])
@pytest.mark.parametrize("lam", [1e-8, 1e-2])
def test_full_equals_lstsq(support, lam):
    U, A, keep, X = _problem(seed=2)
    H = X.t() @ X
    got = pbs_full(U, A, keep, H, SCALE, lam=lam, support=support, row_chunk=4)
    assert torch.allclose(got, _full_oracle(U, A, keep, X, lam, support), rtol=1e-8, atol=1e-10)
    obj = pbs_objective(U, A, keep, H, SCALE, got, support=support, lam=lam)
    none = pbs_objective(U, A, keep, H, SCALE, torch.zeros_like(got), support=support, lam=lam)
    assert bool((obj <= none + 1e-12).all()) and bool((obj < none).any())
    # objective = true output error ||X e_jᵀ||² + λ_eff||Δb||² of the convention's e_j
    m = keep.to(torch.float64)
    R_ = SCALE * got @ A
    E = (R_ * m if support == "kept" else R_) - U * (1 - m)
    true = (X @ E.t()).square().sum(0) + _lam_eff(lam, A, H.diagonal()) * got.square().sum(1)
    assert torch.allclose(obj, true, rtol=1e-9)


def test_full_beats_diagonal_on_correlated_inputs():
    U, A, keep, X = _problem(seed=3)
    H = X.t() @ X
    m = keep.to(torch.float64)

    def out_err(dB):
        E = SCALE * dB @ A - U * (1 - m)
        return float((X @ E.t()).square().sum())

    e_full = out_err(pbs_full(U, A, keep, H, SCALE))
    e_diag = out_err(pbs_diagonal(U, A, keep, H.diagonal(), SCALE))
    e_none = out_err(torch.zeros(OUT, R, dtype=torch.float64))
    assert e_full < e_diag and e_full < e_none
    assert e_full < 0.99 * e_diag


def test_diagonal_objective_matches_full_objective_with_diagonal_H():
    U, A, keep, X = _problem(seed=4)
    d = X.square().sum(0)
    dB = torch.randn(OUT, R, dtype=torch.float64)
    a = pbs_objective(U, A, keep, d, SCALE, dB, kappa=1.0)
    b = pbs_objective(U, A, keep, torch.diag(d), SCALE, dB, support="dense")
    assert torch.allclose(a, b, rtol=1e-12)
    # with κ = 1 the diagonal form is the full form under H = diag(d)
    assert torch.allclose(pbs_diagonal(U, A, keep, d, SCALE), pbs_full(U, A, keep, torch.diag(d), SCALE), rtol=1e-9)
    # and for the kept support a diagonal H leaves nothing to compensate
    assert pbs_full(U, A, keep, torch.diag(d), SCALE, support="kept").abs().max() < 1e-12


def test_shared_gram():
    U, A, keep, X = _problem(seed=5)
    H = X.t() @ X
    dB = pbs_shared_gram(U, A, keep, H, SCALE)
    obj = pbs_objective(U, A, keep, H, SCALE, dB, support="kept")
    none = pbs_objective(U, A, keep, H, SCALE, torch.zeros_like(dB), support="kept")
    exact = pbs_objective(U, A, keep, H, SCALE, pbs_full(U, A, keep, H, SCALE, support="kept"), support="kept")
    assert bool((obj <= none + 1e-12).all()) and bool((obj < none).any())
    assert bool((exact <= obj + 1e-9).all())
    # all-keep: nothing pruned, nothing to do
    allk = torch.ones_like(keep)
    assert torch.equal(pbs_shared_gram(U, A, allk, H, SCALE), torch.zeros(OUT, R, dtype=torch.float64))
    # exact when A vanishes on every pruned column (A ⊙ m_j = A for all rows), row-varying masks
    A2 = A.clone()
    zero_cols = torch.arange(IN) % 3 == 0
    A2[:, zero_cols] = 0.0
    g = torch.Generator().manual_seed(0)
    keep2 = ~(zero_cols[None, :] & (torch.rand(OUT, IN, generator=g) < 0.7))
    assert len({tuple(r) for r in keep2.tolist()}) > 1
    want = pbs_full(U, A2, keep2, H, SCALE, support="kept")
    assert want.abs().max() > 1e-3
    assert torch.allclose(pbs_shared_gram(U, A2, keep2, H, SCALE), want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(pbs_shared_gram(U, A2, keep2, H, SCALE, line_search=False), want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(pbs_full(U, A2, keep2, H, SCALE, support="dense"), want, rtol=1e-9, atol=1e-12)


def test_errors():
    U, A, keep, X = _problem(seed=6)
    H = X.t() @ X
    d = H.diagonal().clone()
    with pytest.raises(StatisticsError, match="A must be"):
        pbs_diagonal(U, A[:, :-1], keep, d, SCALE)
    with pytest.raises(StatisticsError, match="keep"):
        pbs_diagonal(U, A, keep[:, :-1], d, SCALE)
    with pytest.raises(StatisticsError, match="keep"):
        pbs_diagonal(U, A, keep.float(), d, SCALE)
    with pytest.raises(StatisticsError, match="d must"):
        pbs_diagonal(U, A, keep, d[:-1], SCALE)
    dn = d.clone()
    dn[0] = float("nan")
    with pytest.raises(StatisticsError, match=r"\bd\b"):
        pbs_diagonal(U, A, keep, dn, SCALE)
    Hn = H.clone()
    Hn[1, 2] = float("nan")
    with pytest.raises(StatisticsError, match="H"):
        pbs_full(U, A, keep, Hn, SCALE)
    with pytest.raises(StatisticsError, match="H must be"):
        pbs_full(U, A, keep, H[:-1, :-1], SCALE)
    Ha = H.clone()
    Ha[0, 1] += 1.0
    with pytest.raises(StatisticsError, match="symmetric"):
        pbs_full(U, A, keep, Ha, SCALE)
    with pytest.raises(ConfigError, match="support"):
        pbs_full(U, A, keep, H, SCALE, support="sparse")
    with pytest.raises(ConfigError, match="support"):
        pbs_objective(U, A, keep, H, SCALE, torch.zeros(OUT, R, dtype=torch.float64), support="x")
    with pytest.raises(ConfigError, match="kappa"):
        pbs_diagonal(U, A, keep, d, SCALE, kappa=-1.0)
    with pytest.raises(ConfigError, match="scale"):
        pbs_full(U, A, keep, H, 0.0)
    with pytest.raises(ConfigError, match="lam"):
        pbs_full(U, A, keep, H, SCALE, lam=-1.0)
    with pytest.raises(StatisticsError, match="dB"):
        pbs_objective(U, A, keep, H, SCALE, torch.zeros(OUT, R + 1, dtype=torch.float64))


# ---------------------------------------------------------------- authors' order: correction in the base
from xpert_dist.maths.pbs import pbs_into_base  # noqa: E402


def test_full_into_base_is_the_float64_lstsq_over_kept_coordinates():
    """pbs_order=base, pbs=full: the new base row minimises the layer output error ||X (w − u)ᵀ||² over
    w = u ⊙ m + (s·Δb·A) ⊙ m; oracle: float64 lstsq per row, the weight rebuilt independently."""
    U, A, keep, X = _problem(seed=5)
    H = X.t() @ X
    dB = pbs_full(U, A, keep, H, SCALE, lam=0.0, support="kept")
    got = pbs_into_base(U, A, keep, dB, SCALE, "full")
    for j in range(OUT):
        m = keep[j].to(torch.float64)
        design = SCALE * X @ (A * m[None, :]).t()  # [N, r]
        target = X @ (U[j] * (1 - m))  # the pruned part's output, to be re-created on kept coordinates
        b = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        want = U[j] * m + SCALE * (b @ A) * m
        assert torch.allclose(got[j], want, rtol=1e-8, atol=1e-10)
    assert bool((got[~keep] == 0).all())
    err = ((got - U) @ H * (got - U)).sum(1)
    plain = ((U * keep - U) @ H * (U * keep - U)).sum(1)
    assert bool((err <= plain + 1e-9).all()) and bool((err < plain).any())


def test_diagonal_into_base_is_the_released_code():
    """pbs_order=base, pbs=diagonal: B += Δb with the authors' Δbᵀ = −G⁻¹·s·A_S D_S u_Sᵀ
    (paper.md §3.3, scale made explicit), merge, then mask."""
    U, A, keep, X = _problem(seed=6)
    d = X.square().sum(0)
    lam = 1e-3
    dB = pbs_diagonal(U, A, keep, d, SCALE, kappa=1.0, lam=lam)
    got = pbs_into_base(U, A, keep, dB, SCALE, "diagonal")
    G = SCALE ** 2 * (A * d) @ A.t() + _lam_eff(lam, A, d) * torch.eye(R, dtype=torch.float64)
    for j in range(OUT):
        S = (~keep[j]).to(torch.float64)
        rhs = SCALE * (A * (S * d)) @ U[j]
        db_authors = -torch.linalg.solve(G, rhs)
        want = (U[j] + SCALE * db_authors @ A) * keep[j]
        assert torch.allclose(got[j], want, rtol=1e-8, atol=1e-10)
    # what the authors' objective measures: the pruned coordinates are smaller before masking
    before = ((U * ~keep).square() * d).sum()
    after = (((U + SCALE * (-dB) @ A) * ~keep).square() * d).sum()
    assert float(after) < float(before)


def test_into_base_rejects_unknown_form():
    U, A, keep, X = _problem(seed=7)
    with pytest.raises(ConfigError, match="form"):
        pbs_into_base(U, A, keep, torch.zeros(OUT, R, dtype=torch.float64), SCALE, "dense")
