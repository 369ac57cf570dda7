"""Closed-form scores against explicit per-entry formulas; validation errors."""

from __future__ import annotations

import math

import pytest
import torch

from xpert_dist.errors import StatisticsError
from xpert_dist.maths.scores import (
    check_finite,
    ema_scores,
    foresight_scores,
    magnitude_scores,
    wanda_scores,
)


@pytest.fixture()
def Ud():
    g = torch.Generator().manual_seed(3)
    U = torch.randn(5, 7, dtype=torch.float64, generator=g)
    X = torch.randn(11, 7, dtype=torch.float64, generator=g)
    return U, X


def test_magnitude_and_wanda_formulas(Ud):
    U, X = Ud
    d = X.square().sum(0)
    mag = magnitude_scores(U)
    wan = wanda_scores(U, d)
    for j in range(U.shape[0]):
        for i in range(U.shape[1]):
            col = math.sqrt(sum(float(x) ** 2 for x in X[:, i]))
            assert mag[j, i].item() == abs(U[j, i].item())
            assert math.isclose(wan[j, i].item(), abs(U[j, i].item()) * col, rel_tol=1e-13)


def test_foresight_formula_and_default_c(Ud):
    U, X = Ud
    d = X.square().sum(0)
    c = torch.rand(U.shape[0], dtype=torch.float64) + 0.1
    fs = foresight_scores(U, d, c)
    for j in range(U.shape[0]):
        for i in range(U.shape[1]):
            # squared output change of a consumer with column norm² c_j when U[j,i] is zeroed
            want = float((X[:, i] * U[j, i]).square().sum()) * float(c[j])
            assert math.isclose(fs[j, i].item(), want, rel_tol=1e-12)
    assert torch.allclose(foresight_scores(U, d), wanda_scores(U, d).square(), rtol=1e-12)


def test_ema():
    a = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    b = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert torch.equal(ema_scores(a, None, 0.5), a)
    assert torch.allclose(ema_scores(a, b, 0.5), torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64))
    assert torch.allclose(ema_scores(a, b, 0.25), 0.25 * a + 0.75 * b)
    assert torch.equal(ema_scores(a, b, 1.0), a)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(StatisticsError, match="eta"):
            ema_scores(a, b, bad)
    with pytest.raises(StatisticsError, match="shape"):
        ema_scores(a, b[:2], 0.5)
    with pytest.raises(StatisticsError, match="previous"):
        ema_scores(a, torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float64), 0.5)


def test_validation_errors(Ud):
    U, X = Ud
    d = X.square().sum(0)
    with pytest.raises(StatisticsError, match="my_stat"):
        check_finite("my_stat", torch.tensor([1.0, float("nan")]))
    check_finite("ints are fine", torch.tensor([1, 2]))
    bad = d.clone()
    bad[2] = float("nan")
    with pytest.raises(StatisticsError, match=r"\bd\b.*non-finite"):
        wanda_scores(U, bad)
    with pytest.raises(StatisticsError, match="length 7"):
        wanda_scores(U, d[:6])
    with pytest.raises(StatisticsError, match="negative"):
        wanda_scores(U, -d)
    with pytest.raises(StatisticsError, match="c must"):
        foresight_scores(U, d, torch.ones(4, dtype=torch.float64))
    with pytest.raises(StatisticsError, match="2-D"):
        magnitude_scores(U[0])
    Ubad = U.clone()
    Ubad[0, 0] = float("inf")
    with pytest.raises(StatisticsError, match="U"):
        foresight_scores(Ubad, d)


def _brute_force_obs_error(w: torch.Tensor, H: torch.Tensor, i: int) -> float:
    """min over δ with δ_i = -w_i of δᵀHδ: zero entry i of the row, re-fit every other entry by least squares
    (float64 solve of the normal equations on the other coordinates)."""
    rest = [k for k in range(w.numel()) if k != i]
    Hrr, Hri = H[rest][:, rest], H[rest, i]
    d_rest = torch.linalg.solve(Hrr, Hri * w[i])  # the other entries' optimal move
    delta = torch.zeros_like(w)
    delta[i] = -w[i]
    delta[rest] = d_rest
    return float(delta @ H @ delta)


def test_obs_column_factor_gives_the_optimal_brain_surgeon_error():
    from xpert_dist.maths.scores import obs_column_factor

    g = torch.Generator().manual_seed(5)
    mix = torch.randn(6, 6, dtype=torch.float64, generator=g)
    X = torch.randn(40, 6, dtype=torch.float64, generator=g) @ mix  # correlated inputs
    H = X.t() @ X
    U = torch.randn(3, 6, dtype=torch.float64, generator=g)
    r = obs_column_factor(H, percdamp=0.0)
    score = foresight_scores(U, H.diagonal()) * r[None, :]  # = U² / [H⁻¹]_ii
    for j in range(3):
        for i in range(6):
            assert score[j, i].item() == pytest.approx(_brute_force_obs_error(U[j], H, i), rel=1e-8)
    assert bool((r > 0).all()) and bool((r <= 1 + 1e-12).all())
    # uncorrelated inputs (diagonal XᵀX): nothing to re-fit, the factor is 1 and the score is ForeSight's
    assert torch.allclose(obs_column_factor(torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)),
                                            percdamp=0.0), torch.ones(3, dtype=torch.float64))


def test_obs_column_factor_dead_column_and_damping():
    from xpert_dist.maths.scores import obs_column_factor

    g = torch.Generator().manual_seed(6)
    X = torch.randn(30, 5, dtype=torch.float64, generator=g)
    X[:, 2] = 0.0  # an input that is never active
    H = X.t() @ X
    r = obs_column_factor(H, percdamp=0.01)
    assert r[2].item() == 1.0 and bool(torch.isfinite(r).all())
    # the damped oracle: λ = 0.01·mean(diag H) over the live columns' diagonal with the dead one set to 1
    hd = H.diagonal().clone()
    hd[2] = 1.0
    Hd = H.clone()
    Hd[2, 2] = 1.0
    Hd += 0.01 * hd.mean() * torch.eye(5, dtype=torch.float64)
    want = 1.0 / (H.diagonal() * torch.linalg.inv(Hd).diagonal())
    live = [0, 1, 3, 4]
    assert torch.allclose(r[live], want[live], rtol=1e-10)
    with pytest.raises(StatisticsError, match="square"):
        obs_column_factor(torch.zeros(2, 3))
