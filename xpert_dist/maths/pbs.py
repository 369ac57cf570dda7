"""Partial Brain Surgeon (PBS): closed-form LoRA-B update that compensates a fixed mask.

Convention of this project (sign and support). A layer has effective weight ``U = W + s·B·A``
(``U[out, in]``, ``A[r, in]`` fixed, ``s`` the LoRA scale). After a prune step the base becomes
``U ⊙ M`` (adapter merged, pruned entries zeroed; ``M`` = keep mask) and a *new* adapter
``s·ΔB·A`` compensates. Row ``j``'s error against the dense effective row ``U_j`` is

* ``support="dense"``: ``e_j = s·Δb_j·A − U_j ⊙ (1 − M_j)``  (the adapter acts on all columns;
  a later merge must re-apply the mask);
* ``support="kept"``:  ``e_j = (s·Δb_j·A) ⊙ M_j − U_j ⊙ (1 − M_j)``  (the adapter is masked
  too, so merging never re-densifies the matrix).

So ``ΔB`` *re-adds* what pruning removed. The authors' code writes the same diagonal problem as
"make ``U + Δb'·A`` small on the pruned set before masking"; the two are related by
``ΔB = −ΔB'/s``.

Solvers (all return ``ΔB[out, r]``):

* :func:`pbs_diagonal` (authors' form, ``D = diag(d)``, ``d = diag(XᵀX)``): minimises
  ``||(sΔbA_P − U_P) D_P^½||² + κ||sΔbA_K D_K^½||² + λ_eff||Δb||²``; per row the Gram is
  ``G_j = s²(κ·A D Aᵀ + (1−κ)·A_P D_P A_Pᵀ) + λ_eff·I`` (shared when κ = 1).
* :func:`pbs_full` (needs the full ``H = XᵀX``): exact minimiser of ``e_j H e_jᵀ + λ_eff||Δb_j||²``
  for either support; ``"dense"`` shares one Gram ``s²·A H Aᵀ``, ``"kept"`` needs a per-row Gram
  ``s²·(A⊙m_j) H (A⊙m_j)ᵀ`` (batched over row chunks; cost ``out·r·in²``).
* :func:`pbs_shared_gram`: cheap approximation for ``"kept"``: exact right-hand sides with the
  shared Gram ``s²·A H Aᵀ``, followed (by default) by an exact line search per row along that
  direction, which guarantees the kept-support objective never exceeds the no-update one.

Where the correction lands (``prune.pbs_order``): ``adapter`` (above) writes ``ΔB`` into a new adapter;
``base`` is the authors' order (B += Δb, merge, then mask), :func:`pbs_into_base`: the correction is
merged into the base and masked, so it survives in the kept base weights and B restarts at 0. For the
diagonal form that is the released code's ``(U − s·ΔB·A) ⊙ M`` (their ``Δb = −ΔB``: "make the pruned
coordinates small before masking", note 3 of paper.md §3.3); for ``full``/``shared`` the kept-support
solution ``U ⊙ M + (s·ΔB·A) ⊙ M``, i.e. the exact minimiser of the layer output error
``||X (W_new − U)ᵀ||²`` over base updates of the form ``(s·Δb_j·A) ⊙ m_j``.

The ridge ``λ`` is RELATIVE: ``λ_eff = lam · mean(diag(s²·A D Aᵀ))`` with ``D = diag(d)`` or
``diag(diag H)`` (``= lam`` if that mean is 0), so ``lam`` does not depend on the token count
or the activation scale. Under a diagonal ``H`` the kept-support optimum is ``ΔB = 0`` (the
kept columns cannot be improved without cross terms), see paper.md §3.3 note 3.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xpert_dist.errors import ConfigError, StatisticsError
from xpert_dist.maths.scores import check_finite

__all__ = ["SUPPORTS", "pbs_diagonal", "pbs_full", "pbs_shared_gram", "pbs_objective", "pbs_into_base"]

SUPPORTS = ("dense", "kept")
_CHUNK_ELEMS = 1 << 24  # elements of the [chunk, r, in] temporaries


def _validate(U: Tensor, A: Tensor, keep: Tensor, stat: Tensor, scale: float, want: str):
    """Check shapes/finiteness; return (U, A, keep-as-float, stat, scale, dtype)."""
    if not isinstance(U, Tensor) or U.dim() != 2:
        raise StatisticsError(f"U must be a 2-D weight [out, in], got {getattr(U, 'shape', type(U))}")
    out_f, in_f = U.shape
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[1] != in_f:
        raise StatisticsError(f"A must be [r, in={in_f}], got {getattr(A, 'shape', type(A))}")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != U.shape:
        raise StatisticsError(
            f"keep must be a bool mask of U's shape {tuple(U.shape)}, got "
            f"{getattr(keep, 'dtype', type(keep))} {tuple(getattr(keep, 'shape', ()))}"
        )
    check_finite("U", U)
    check_finite("A", A)
    if want == "d" or (want == "any" and isinstance(stat, Tensor) and stat.dim() == 1):
        if not isinstance(stat, Tensor) or stat.dim() != 1 or stat.shape[0] != in_f:
            raise StatisticsError(f"d must be 1-D of length in={in_f}, got {getattr(stat, 'shape', type(stat))}")
        check_finite("d", stat)
        if bool((stat < 0).any()):
            raise StatisticsError("d = diag(XᵀX) has negative entries")
    else:
        if not isinstance(stat, Tensor) or tuple(stat.shape) != (in_f, in_f):
            raise StatisticsError(f"H must be [in, in] = [{in_f}, {in_f}], got {getattr(stat, 'shape', type(stat))}")
        check_finite("H", stat)
        if not _is_symmetric(stat):
            raise StatisticsError("H = XᵀX must be symmetric")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"scale (LoRA alpha/r) must be a number, got {scale!r}") from None
    if not (scale == scale) or scale in (float("inf"), float("-inf")) or scale == 0.0:
        raise ConfigError(f"scale (LoRA alpha/r) must be finite and non-zero, got {scale}")
    dt = torch.promote_types(torch.promote_types(U.dtype, A.dtype), torch.promote_types(stat.dtype, torch.float32))
    return U.to(dt), A.to(dt), keep, stat.to(dt), scale, dt


def _is_symmetric(H: Tensor, rtol: float = 1e-6, block: int = 512) -> bool:
    """``max|H − Hᵀ| <= rtol·max|H|``, compared tile by tile (``block × block`` tiles above the
    diagonal against their mirror: no full-size ``H − Hᵀ`` temporaries, which at width 28,672 are
    3.3 GB each in fp32, and cache-sized transposes instead of strided column blocks)."""
    if not H.numel():
        return True
    tol = rtol * max(abs(float(H.max())), abs(float(H.min())))  # max|H| without an |H| temporary
    n = H.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        for j0 in range(i0, n, block):
            j1 = min(j0 + block, n)
            if float((H[i0:i1, j0:j1] - H[j0:j1, i0:i1].t()).abs().amax()) > tol:
                return False
    return True


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not (lam >= 0.0) or lam == float("inf"):
        raise ConfigError(f"lam (relative ridge) must be finite and >= 0, got {lam}")
    return lam


def _lam_eff(lam: float, A: Tensor, dvec: Tensor, scale: float) -> float:
    """``lam · mean(diag(s²·A D Aᵀ))`` (``lam`` itself if that mean is 0)."""
    m = float((A.square() * dvec[None, :]).sum(1).mean()) * scale * scale
    return lam * m if m > 0 else lam


def _solve(G: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``G x = rhs`` for symmetric PSD ``G`` ([..., r, r]); pseudo-inverse where singular."""
    L, info = torch.linalg.cholesky_ex(G)
    x = torch.cholesky_solve(rhs, L)
    bad = info != 0
    if bool(bad.any()):
        if G.dim() == 2:
            return torch.linalg.pinv(G, hermitian=True) @ rhs
        x[bad] = torch.linalg.pinv(G[bad], hermitian=True) @ rhs[bad]
    return x


def _chunk(r: int, in_f: int, row_chunk: int | None) -> int:
    if row_chunk is not None:
        if int(row_chunk) <= 0:
            raise ConfigError(f"row_chunk must be positive, got {row_chunk}")
        return int(row_chunk)
    return max(1, _CHUNK_ELEMS // max(1, r * in_f))


def pbs_diagonal(
    U: Tensor, A: Tensor, keep: Tensor, d: Tensor, scale: float,
    kappa: float = 1.0, lam: float = 1e-8, *, row_chunk: int | None = None,
) -> Tensor:
    """Diagonal-form PBS (authors' objective, module docstring): ``ΔB[out, r]``.

    ``kappa >= 0`` weights the do-no-harm term on kept columns; κ = 1 gives one shared Gram
    ``s²·A D Aᵀ + λ_eff·I`` (one r×r factorisation), otherwise per-row Grams (batched).
    """
    U, A, keep, d, s, dt = _validate(U, A, keep, d, scale, "d")
    kappa = float(kappa)
    if not (kappa >= 0.0) or kappa == float("inf"):
        raise ConfigError(f"kappa must be finite and >= 0, got {kappa}")
    lam_e = _lam_eff(_check_lam(lam), A, d, s)
    r = A.shape[0]
    P = (~keep).to(dt)
    rhs = s * ((U * P * d[None, :]) @ A.t())  # [out, r]: s·A_P D_P U_Pᵀ per row
    eye = torch.eye(r, dtype=dt, device=U.device)
    ADA = (A * d[None, :]) @ A.t()
    if kappa == 1.0:
        G = s * s * ADA + lam_e * eye
        return _solve(G, rhs.t()).t()
    out = torch.empty(U.shape[0], r, dtype=dt, device=U.device)
    c = _chunk(r, A.shape[1], row_chunk)
    for j0 in range(0, U.shape[0], c):
        j1 = min(j0 + c, U.shape[0])
        AP = A[None, :, :] * (P[j0:j1] * d[None, :])[:, None, :]  # [c, r, in]
        G = s * s * (kappa * ADA[None] + (1.0 - kappa) * (AP @ A.t())) + lam_e * eye
        out[j0:j1] = _solve(G, rhs[j0:j1, :, None])[..., 0]
    return out


def pbs_full(
    U: Tensor, A: Tensor, keep: Tensor, H: Tensor, scale: float,
    lam: float = 1e-8, support: str = "dense", *, row_chunk: int | None = None,
) -> Tensor:
    """Full-Hessian PBS: exact ``argmin e_j H e_jᵀ + λ_eff||Δb_j||²`` per row, ``ΔB[out, r]``."""
    if support not in SUPPORTS:
        raise ConfigError(f"support must be one of {SUPPORTS}, got {support!r}")
    U, A, keep, H, s, dt = _validate(U, A, keep, H, scale, "H")
    lam_e = _lam_eff(_check_lam(lam), A, H.diagonal(), s)
    r = A.shape[0]
    eye = torch.eye(r, dtype=dt, device=U.device)
    if support == "dense":  # A·H first: r·in² + out·in·r flops instead of out·in² for (U⊙P)·H
        AH = A @ H  # [r, in]
        G = s * s * (AH @ A.t()) + lam_e * eye
        return _solve(G, s * (AH @ (U * (~keep).to(dt)).t())).t()
    Hu = (U * (~keep).to(dt)) @ H  # [out, in]: H u_jᵀ per row (H symmetric)
    out = torch.empty(U.shape[0], r, dtype=dt, device=U.device)
    c = _chunk(r, A.shape[1], row_chunk)
    for j0 in range(0, U.shape[0], c):
        j1 = min(j0 + c, U.shape[0])
        Am = A[None, :, :] * keep[j0:j1, None, :].to(dt)  # [c, r, in] = A ⊙ m_j
        G = s * s * ((Am @ H) @ Am.transpose(1, 2)) + lam_e * eye
        rhs = s * torch.einsum("cri,ci->cr", Am, Hu[j0:j1])
        out[j0:j1] = _solve(G, rhs[:, :, None])[..., 0]
    return out


def pbs_shared_gram(
    U: Tensor, A: Tensor, keep: Tensor, H: Tensor, scale: float,
    lam: float = 1e-8, *, line_search: bool = True,
) -> Tensor:
    """Cheap kept-support PBS: exact per-row right-hand sides ``s·(A⊙m_j) H u_jᵀ`` solved with the
    one shared Gram ``s²·A H Aᵀ + λ_eff·I``; then, if ``line_search``, each row is rescaled by the
    exact minimiser ``t_j >= 0`` of the kept-support objective along it (never worse than ΔB = 0).
    Exact whenever ``A ⊙ m_j = A`` (A vanishes on the row's pruned columns).
    """
    U, A, keep, H, s, dt = _validate(U, A, keep, H, scale, "H")
    lam_e = _lam_eff(_check_lam(lam), A, H.diagonal(), s)
    r = A.shape[0]
    eye = torch.eye(r, dtype=dt, device=U.device)
    Km = keep.to(dt)
    Hu = (U * (1.0 - Km)) @ H
    rhs = s * ((Hu * Km) @ A.t())  # [out, r]
    G = s * s * (A @ H @ A.t()) + lam_e * eye
    X = _solve(G, rhs.t()).t()
    if not line_search:
        return X
    V = (X @ A) * Km  # x_j (A ⊙ m_j)
    quad = s * s * ((V @ H) * V).sum(1) + lam_e * X.square().sum(1)
    lin = (X * rhs).sum(1)
    t = torch.where(quad > 0, lin / torch.where(quad > 0, quad, torch.ones_like(quad)), torch.zeros_like(quad))
    return X * t.clamp_min(0.0)[:, None]


def pbs_objective(
    U: Tensor, A: Tensor, keep: Tensor, H_or_d: Tensor, scale: float, dB: Tensor,
    *, support: str = "dense", kappa: float = 1.0, lam: float = 1e-8,
) -> Tensor:
    """Per-row objective values ``[out]`` of an update ``dB`` (use ``dB = 0`` for "no update").

    1-D ``d``: the diagonal-form objective of :func:`pbs_diagonal` (κ-weighted; ``support`` not
    used). 2-D ``H``: ``e_j H e_jᵀ`` with ``e_j`` per ``support`` (module docstring). Both add
    ``λ_eff·||Δb_j||²`` with the same relative ``λ_eff`` as the solvers.
    """
    if support not in SUPPORTS:
        raise ConfigError(f"support must be one of {SUPPORTS}, got {support!r}")
    U, A, keep, st, s, dt = _validate(U, A, keep, H_or_d, scale, "any")
    if not isinstance(dB, Tensor) or tuple(dB.shape) != (U.shape[0], A.shape[0]):
        raise StatisticsError(f"dB must be [out, r] = [{U.shape[0]}, {A.shape[0]}], got {getattr(dB, 'shape', None)}")
    check_finite("dB", dB)
    dB = dB.to(dt)
    lam = _check_lam(lam)
    Km = keep.to(dt)
    R = s * (dB @ A)  # adapter rows
    diag = st if st.dim() == 1 else st.diagonal()
    reg = _lam_eff(lam, A, diag, s) * dB.square().sum(1)
    if st.dim() == 1:
        kappa = float(kappa)
        ep = (R - U) * (1.0 - Km)
        ek = R * Km
        return (ep.square() * st[None, :]).sum(1) + kappa * (ek.square() * st[None, :]).sum(1) + reg
    E = (R * Km if support == "kept" else R) - U * (1.0 - Km)
    return ((E @ st) * E).sum(1) + reg


def pbs_into_base(U: Tensor, A: Tensor, keep: Tensor, dB: Tensor, scale: float, form: str) -> Tensor:
    """The new base weight of the authors' order (module docstring): ``form="diagonal"`` gives
    ``(U − s·ΔB·A) ⊙ M`` (the released code's sign), ``"full"``/``"shared"`` give ``(U + s·ΔB·A) ⊙ M``
    (``ΔB`` from the kept-support solvers)."""
    if form not in ("diagonal", "full", "shared"):
        raise ConfigError(f"form must be diagonal, full or shared, got {form!r}")
    dt = torch.promote_types(U.dtype, torch.float32)
    sign = -1.0 if form == "diagonal" else 1.0
    new = U.to(dt) + sign * float(scale) * (dB.to(dt) @ A.to(dt))
    return new * keep.to(dt)
