"""ForeSight consumer factors ``c_j`` for one Llama-style block, and the authors' heuristic variant.

The ForeSight score of entry ``U[j, i]`` is ``U[j,i]² · d_i · c_j`` (:func:`scores.foresight_scores`),
where ``c_j = ||U₂[:, j]||²`` and ``U₂`` is the linear map through which the *consumer* reads
output ``j``. This module builds ``c`` for the seven linear maps of a Llama block
(``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``, weights ``[out, in]``).

Weight-only ("isotropic input") definitions, the project's decision (docs METHOD.md):

* ``q_proj`` row ``(h, t)`` (head ``h``, head-dim ``t``): the logit ``q_h · k_{g(h)}`` reads
  ``q_{h,t}`` through the key row ``U_k[g(h)·hd + t, :]``; for isotropic key inputs the squared
  logit change is ``||U_k[g(h)·hd+t, :]||²``. GQA: ``g(h) = h // (n_heads // n_kv_heads)``.
* ``k_proj`` row ``(g, t)``: ``k_{g,t}`` enters the logits of every query head ``h`` of group
  ``g``; these are distinct outputs, so ``c = Σ_{h∈g} ||U_q[h·hd+t, :]||²``.
* ``v_proj`` row ``(g, t)``: attention copies ``v_g`` to every query head of the group, and
  ``o_proj`` reads those copies through its columns ``h·hd + t`` and *adds* them, so the exact
  map (length-1 sequences, or identical attention rows across the group) is the summed column:
  ``c = ||Σ_{h∈g} U_o[:, h·hd+t]||²`` (``v_group="sum"``, default). The alternative
  ``v_group="sum_of_norms"`` gives ``Σ_{h∈g} ||U_o[:, h·hd+t]||²``: the expectation when the
  heads of a group attend to uncorrelated positions. Both coincide without GQA.
  The ``1/sqrt(hd)`` softmax scale and the softmax Jacobian are omitted: for q/k they are one
  constant per matrix (no effect on any per-matrix mask); for v, attention weights are
  token-dependent and convex, treated as a copy.
* ``o_proj`` row ``j``: the output is added to the residual stream and read by the MLP through
  RMSNorm: ``gate/up(γ ⊙ h / rms(h))``. With the normalisation denominator ``rms(h)`` treated as
  fixed (it is one positive scalar per token, shared by every ``j``), the map is
  ``[U_gate; U_up]·diag(γ)``, so ``c_j = γ_j² (||U_gate[:, j]||² + ||U_up[:, j]||²)``.
* ``gate_proj``, ``up_proj`` row ``j``: ``down(SiLU(g) ⊙ u)`` linearised with the activation-
  dependent gains ``SiLU'(g_j)·u_j`` and ``SiLU(g_j)`` dropped (weight-only):
  ``c_j = ||U_down[:, j]||²``.
* ``down_proj`` row ``j``: the residual stream again, read by the next block's attention
  (through its input RMSNorm gain ``γa``: q, k, v) and MLP (gain ``γm``: gate, up):
  ``c_j = γa_j² (||q'[:,j]||² + ||k'[:,j]||² + ||v'[:,j]||²) + γm_j² (||gate'[:,j]||² + ||up'[:,j]||²)``;
  for the last block (``next_U=None``) ``c ≡ 1`` (Wanda-squared).

Squares and sums are computed in at least float32 (float64 if the input is float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from xpert_dist.errors import ConfigError, ModelStructureError, StatisticsError
from xpert_dist.maths.scores import check_finite, foresight_scores

__all__ = [
    "MODULES",
    "consumer_factors",
    "foresight_exact_scores",
    "foresight_reference_scores",
]

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEXT_NEEDED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
V_GROUP_MODES = ("sum", "sum_of_norms")


def _check_names(U: dict, what: str) -> None:
    if not isinstance(U, dict):
        raise ConfigError(f"{what} must be a dict of module short name -> weight, got {type(U).__name__}")
    unknown = sorted(set(U) - set(MODULES))
    if unknown:
        raise ConfigError(f"{what}: unknown module name(s) {unknown}; expected a subset of {list(MODULES)}")


def _check_heads(n_heads: int, n_kv_heads: int) -> int:
    if int(n_heads) <= 0 or int(n_kv_heads) <= 0:
        raise ConfigError(f"n_heads ({n_heads}) and n_kv_heads ({n_kv_heads}) must be positive")
    if n_heads % n_kv_heads:
        raise ConfigError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    return n_heads // n_kv_heads


def _need(U: dict, name: str, consumer_of: str, where: str = "U") -> Tensor:
    if name not in U:
        raise ModelStructureError(f"{where}['{name}'] is needed as the consumer of '{consumer_of}' but is missing")
    w = U[name]
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ModelStructureError(f"{where}['{name}'] must be a 2-D weight [out, in]")
    check_finite(f"{where}['{name}']", w)
    return w.to(torch.promote_types(w.dtype, torch.float32))


def _head_dim(U: dict, n_heads: int, n_kv_heads: int) -> int:
    """Head dimension from whichever attention weight is present (q.out/H, k|v.out/G, o.in/H)."""
    for name, dim, n in (("q_proj", 0, n_heads), ("k_proj", 0, n_kv_heads),
                         ("v_proj", 0, n_kv_heads), ("o_proj", 1, n_heads)):
        if name in U:
            size = U[name].shape[dim]
            if size % n:
                raise ModelStructureError(f"{name} has {size} features along dim {dim}, not divisible by {n} heads")
            return size // n
    return 0


def _check_shape(name: str, w: Tensor, shape: tuple) -> None:
    if tuple(w.shape) != tuple(shape):
        raise ModelStructureError(f"{name} has shape {tuple(w.shape)}, expected {tuple(shape)}")


def _gain(name: str, g: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Squared RMSNorm gain γ² (ones if None), validated to length ``n``."""
    if g is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    if not isinstance(g, Tensor) or g.dim() != 1 or g.shape[0] != n:
        raise ModelStructureError(f"{name} must be a 1-D tensor of length {n}")
    check_finite(name, g)
    return g.to(like.dtype).square()


def consumer_factors(
    U: dict[str, Tensor],
    n_heads: int,
    n_kv_heads: int,
    next_U: dict[str, Tensor] | None = None,
    mlp_norm_weight: Tensor | None = None,
    next_attn_norm_weight: Tensor | None = None,
    next_mlp_norm_weight: Tensor | None = None,
    *,
    v_group: str = "sum",
    names=None,
) -> dict[str, Tensor]:
    """Consumer factors ``c`` (one per output row) for every module present in ``U``.

    See the module docstring for the definitions. Returns ``{name: c[out]}`` for each key of
    ``U`` (or only for ``names``, a subset of ``U``'s keys; the other entries of ``U`` then just
    serve as consumers). Raises ConfigError for unknown names / head counts / ``v_group``, and
    ModelStructureError when a consumer weight is missing or has an inconsistent shape.
    """
    _check_names(U, "U")
    rep = _check_heads(n_heads, n_kv_heads)
    if v_group not in V_GROUP_MODES:
        raise ConfigError(f"v_group must be one of {V_GROUP_MODES}, got {v_group!r}")
    if next_U is not None:
        _check_names(next_U, "next_U")
    hd = _head_dim(U, n_heads, n_kv_heads)
    G = n_kv_heads
    rows = {"q_proj": n_heads * hd, "k_proj": G * hd, "v_proj": G * hd}
    todo = list(U) if names is None else list(names)
    missing = [n for n in todo if n not in U]
    if missing:
        raise ConfigError(f"names {missing} are not keys of U ({sorted(U)})")
    out: dict[str, Tensor] = {}
    for name in todo:
        if name in rows and U[name].shape[0] != rows[name]:
            raise ModelStructureError(
                f"{name} has {U[name].shape[0]} output rows, expected {rows[name]} "
                f"(heads x head_dim {hd})"
            )
        if name == "q_proj":
            k = _need(U, "k_proj", name)
            _check_shape("k_proj", k, (G * hd, U["q_proj"].shape[1]))
            kn = k.square().sum(1).view(G, hd)
            out[name] = kn[torch.arange(n_heads, device=k.device) // rep].reshape(-1)
        elif name == "k_proj":
            q = _need(U, "q_proj", name)
            _check_shape("q_proj", q, (n_heads * hd, U["k_proj"].shape[1]))
            out[name] = q.square().sum(1).view(G, rep, hd).sum(1).reshape(-1)
        elif name == "v_proj":
            o = _need(U, "o_proj", name)
            _check_shape("o_proj", o, (o.shape[0], n_heads * hd))
            cols = o.view(o.shape[0], G, rep, hd)
            if v_group == "sum":
                out[name] = cols.sum(2).square().sum(0).reshape(-1)
            else:
                out[name] = cols.square().sum((0, 2)).reshape(-1)
        elif name == "o_proj":
            gate = _need(U, "gate_proj", name)
            up = _need(U, "up_proj", name)
            hidden = U["o_proj"].shape[0]
            _check_shape("gate_proj", gate, (gate.shape[0], hidden))
            _check_shape("up_proj", up, gate.shape)
            g2 = _gain("mlp_norm_weight", mlp_norm_weight, hidden, gate)
            out[name] = g2 * (gate.square().sum(0) + up.square().sum(0))
        elif name in ("gate_proj", "up_proj"):
            down = _need(U, "down_proj", name)
            _check_shape("down_proj", down, (down.shape[0], U[name].shape[0]))
            out[name] = down.square().sum(0)
        elif name == "down_proj":
            hidden = U["down_proj"].shape[0]
            w = U["down_proj"]
            dt = torch.promote_types(w.dtype, torch.float32)
            if next_U is None:
                out[name] = torch.ones(hidden, dtype=dt, device=w.device)
                continue
            nxt = {m: _need(next_U, m, "down_proj", "next_U") for m in _NEXT_NEEDED}
            for m, t in nxt.items():
                _check_shape(f"next_U['{m}']", t, (t.shape[0], hidden))
            ga = _gain("next_attn_norm_weight", next_attn_norm_weight, hidden, nxt["q_proj"])
            gm = _gain("next_mlp_norm_weight", next_mlp_norm_weight, hidden, nxt["q_proj"])
            attn = sum(nxt[m].square().sum(0) for m in ("q_proj", "k_proj", "v_proj"))
            mlp = sum(nxt[m].square().sum(0) for m in ("gate_proj", "up_proj"))
            out[name] = ga * attn + gm * mlp
    return out


def foresight_exact_scores(
    U: dict[str, Tensor], d: dict[str, Tensor], n_heads: int, n_kv_heads: int, **consumer_kw
) -> dict[str, Tensor]:
    """ForeSight ``U² · d · c`` for every module of ``U`` (``variant = exact``).

    ``d[name]`` is ``diag(XᵀX)`` of that module's input; ``consumer_kw`` go to
    :func:`consumer_factors` (next_U, norm weights, v_group, names: scores only for those).
    """
    c = consumer_factors(U, n_heads, n_kv_heads, **consumer_kw)
    missing = [m for m in c if m not in d]
    if missing:
        raise StatisticsError(f"no input statistics d for module(s) {missing}")
    return {m: foresight_scores(U[m], d[m], c[m]) for m in c}


def foresight_reference_scores(
    U: dict[str, Tensor], d: dict[str, Tensor], n_tokens: int, n_heads: int, n_kv_heads: int
) -> dict[str, Tensor]:
    """The authors' released-code heuristic (``variant = reference``).

    Implements the per-module table of ``shared/reference/paper.md`` §3.2 ("Per-module
    implementation in the released code", ``pruning/prune.py::foresight_prune``) with
    ``X̂ = sqrt(d / n_tokens)`` (per-input-column RMS activation) and ``|·|`` of the effective
    weights given in ``U`` (the released code omitted the LoRA scale α/r there; pass ``U`` built
    however the caller decides). Norms are L2, not squared; the score is linear in ``|U|``:

    ========== =========================================================================
    q_proj     ``|Q|[h,t,i] · ||K[g(h), :, i]||₂ · X̂_i``            (factor per head, input)
    k_proj     ``|K|[g,t,i] · RMS_{h∈g} ||Q[h, :, i]||₂ · X̂_i``       (per kv group, input)
    v_proj     ``|V|[g,t,i] · RMS_{h∈g} ||O[:, h·hd+t]||₂ · X̂_i``     (per output row)
    o_proj     ``|O|[j,i] · X̂_i · (||Gate[:, j]||₂ + ||Up[:, j]||₂)/2`` (per output row)
    gate, up   ``|W|[j,i] · ||Down[i, :]||₂ · X̂_i``                   (per *input* column)
    down_proj  ``|W|[j,i] · X̂_i``                                      (plain Wanda)
    ========== =========================================================================
    """
    _check_names(U, "U")
    rep = _check_heads(n_heads, n_kv_heads)
    if not (isinstance(n_tokens, int) or (isinstance(n_tokens, float) and n_tokens.is_integer())) \
            or n_tokens <= 0:
        raise StatisticsError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    hd = _head_dim(U, n_heads, n_kv_heads)
    G = n_kv_heads
    out: dict[str, Tensor] = {}
    for name in U:
        w = _need(U, name, name)
        if name not in d:
            raise StatisticsError(f"no input statistics d for module '{name}'")
        dv = d[name]
        if not isinstance(dv, Tensor) or dv.dim() != 1 or dv.shape[0] != w.shape[1]:
            raise StatisticsError(f"d['{name}'] must be 1-D of length {w.shape[1]}")
        check_finite(f"d['{name}']", dv)
        if bool((dv < 0).any()):
            raise StatisticsError(f"d['{name}'] has negative entries")
        dt = torch.promote_types(w.dtype, dv.dtype)
        w = w.to(dt)
        xhat = (dv.to(dt) / float(n_tokens)).sqrt()
        a = w.abs()
        n_in = w.shape[1]
        if name == "q_proj":
            k = _need(U, "k_proj", name).to(dt)
            _check_shape("k_proj", k, (G * hd, n_in))
            kn = k.view(G, hd, n_in).norm(dim=1)  # [G, in]
            fac = kn[torch.arange(n_heads, device=k.device) // rep]  # [H, in]
            s = a.view(n_heads, hd, n_in) * fac[:, None, :] * xhat
        elif name == "k_proj":
            q = _need(U, "q_proj", name).to(dt)
            _check_shape("q_proj", q, (n_heads * hd, n_in))
            qn2 = q.view(G, rep, hd, n_in).square().sum(2)  # [G, rep, in]
            fac = qn2.mean(1).sqrt()  # [G, in]
            s = a.view(G, hd, n_in) * fac[:, None, :] * xhat
        elif name == "v_proj":
            o = _need(U, "o_proj", name).to(dt)
            _check_shape("o_proj", o, (o.shape[0], n_heads * hd))
            on2 = o.view(o.shape[0], G, rep, hd).square().sum(0)  # [G, rep, hd]
            fac = on2.mean(1).sqrt()  # [G, hd]
            s = a.view(G, hd, n_in) * fac[:, :, None] * xhat
        elif name == "o_proj":
            gate = _need(U, "gate_proj", name).to(dt)
            up = _need(U, "up_proj", name).to(dt)
            _check_shape("gate_proj", gate, (gate.shape[0], w.shape[0]))
            _check_shape("up_proj", up, gate.shape)
            fac = (gate.norm(dim=0) + up.norm(dim=0)) / 2.0  # [hidden] = o rows
            s = a * xhat[None, :] * fac[:, None]
        elif name in ("gate_proj", "up_proj"):
            down = _need(U, "down_proj", name).to(dt)
            _check_shape("down_proj", down, (n_in, w.shape[0]))
            fac = down.norm(dim=1)  # [hidden] = gate/up input columns
            s = a * fac[None, :] * xhat[None, :]
        else:  # down_proj
            s = a * xhat[None, :]
        out[name] = s.reshape(w.shape)
    return out
