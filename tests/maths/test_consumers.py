"""ForeSight consumer factors against brute force on a tiny random HF Llama (float64).

For every module type, the ForeSight score ``U[j,i]²·d_i·c_j`` must equal the measured squared
change of the consumer's output when that single entry of ``U`` is zeroed, where the consumer
is built independently of xpert_dist (real HF attention for v->o, explicit bilinear logits with
HF RoPE at position 0 for q/k, explicit RMSNorm-gain maps for o and down, HF down_proj for gate/up).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from xpert_dist.errors import ConfigError, ModelStructureError, StatisticsError
from xpert_dist.maths.consumers import (
    consumer_factors,
    foresight_exact_scores,
    foresight_reference_scores,
)
from xpert_dist.maths.scores import foresight_scores, wanda_scores

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaModel,
    apply_rotary_pos_emb,
    repeat_kv,
)

H_, G_, HID, INTER = 4, 2, 32, 64
HD = HID // H_
N_TOK = 6
N_ENTRIES = 10  # brute-forced entries per module
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=HID, intermediate_size=INTER, num_attention_heads=H_, num_key_value_heads=G_,
        num_hidden_layers=2, vocab_size=64, max_position_embeddings=16,
    )
    cfg._attn_implementation = "eager"
    m = LlamaModel(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * 0.3)
            else:  # RMSNorm gains: non-trivial, positive and negative magnitudes
                p.copy_(torch.rand_like(p) + 0.5)
    return m


def _weights(layer) -> dict[str, torch.Tensor]:
    U = {n: getattr(layer.self_attn, n).weight.detach().clone() for n in ATTN}
    U.update({n: getattr(layer.mlp, n).weight.detach().clone() for n in MLP})
    return U


def _rope0(model, n: int):
    """HF rotary cos/sin at position 0 (identity rotation) for n rows."""
    x = torch.zeros(n, 1, HID, dtype=torch.float64)
    return model.rotary_emb(x, torch.zeros(n, 1, dtype=torch.long))


def _logits(model, Uq, Uk, Xq, Xk):
    """All attention logits q_h(x)·k_{g(h)}(y) (no 1/sqrt(hd) scale), HF RoPE at position 0."""
    q = (Xq @ Uq.t()).view(1, -1, H_, HD).transpose(1, 2)  # [1, H, Nq, hd]
    k = (Xk @ Uk.t()).view(1, -1, G_, HD).transpose(1, 2)  # [1, G, Nk, hd]
    cq, sq = _rope0(model, q.shape[2])
    ck, sk = _rope0(model, k.shape[2])
    q, _ = apply_rotary_pos_emb(q, q, cq.view(1, -1, HD), sq.view(1, -1, HD))
    _, k = apply_rotary_pos_emb(k, k, ck.view(1, -1, HD), sk.view(1, -1, HD))
    return q @ repeat_kv(k, H_ // G_).transpose(2, 3)


def _consumer(model, name: str, X: torch.Tensor, block: int):
    """f(U_module) -> consumer output, built from HF modules / explicit maps (not xpert_dist)."""
    layer = model.layers[block]
    U = _weights(layer)
    eye = torch.eye(HID, dtype=torch.float64)
    if name == "q_proj":
        return lambda W: _logits(model, W, U["k_proj"], X, eye)
    if name == "k_proj":
        return lambda W: _logits(model, U["q_proj"], W, eye, X)
    if name == "v_proj":
        attn = layer.self_attn
        cos, sin = _rope0(model, X.shape[0])

        def f(W):
            old = attn.v_proj.weight.data.clone()
            attn.v_proj.weight.data.copy_(W)
            try:  # batch of length-1 sequences: softmax over one key = 1, attention copies v
                out, _ = attn(hidden_states=X[:, None, :], position_embeddings=(cos, sin), attention_mask=None)
            finally:
                attn.v_proj.weight.data.copy_(old)
            return out

        return f
    if name == "o_proj":
        g = layer.post_attention_layernorm.weight.detach()
        return lambda W: torch.cat([layer.mlp.gate_proj((X @ W.t()) * g), layer.mlp.up_proj((X @ W.t()) * g)], 1)
    if name in ("gate_proj", "up_proj"):
        return lambda W: layer.mlp.down_proj(X @ W.t())
    if name == "down_proj":
        if block + 1 >= len(model.layers):
            return lambda W: X @ W.t()  # last block: identity consumer (c = 1)
        nxt = model.layers[block + 1]
        ga = nxt.input_layernorm.weight.detach()
        gm = nxt.post_attention_layernorm.weight.detach()

        def f(W):
            y = X @ W.t()
            a, b = y * ga, y * gm
            sa = nxt.self_attn
            return torch.cat([sa.q_proj(a), sa.k_proj(a), sa.v_proj(a), nxt.mlp.gate_proj(b), nxt.mlp.up_proj(b)], 1)

        return f
    raise AssertionError(name)


def _c(model, block: int, **kw):
    layer = model.layers[block]
    args = dict(mlp_norm_weight=layer.post_attention_layernorm.weight.detach())
    if block + 1 < len(model.layers):
        nxt = model.layers[block + 1]
        args.update(
            next_U=_weights(nxt),
            next_attn_norm_weight=nxt.input_layernorm.weight.detach(),
            next_mlp_norm_weight=nxt.post_attention_layernorm.weight.detach(),
        )
    args.update(kw)
    return consumer_factors(_weights(layer), H_, G_, **args)


@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("name", ATTN + MLP)
@torch.no_grad()
def test_foresight_matches_brute_force(model, name, block):
    U = _weights(model.layers[block])[name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{block}".encode()))
    X = torch.randn(N_TOK, U.shape[1], dtype=torch.float64, generator=gen)
    d = X.square().sum(0)
    c = _c(model, block)[name]
    score = foresight_scores(U, d, c)
    f = _consumer(model, name, X, block)
    base = f(U)
    flat = torch.randperm(U.numel(), generator=gen)[:N_ENTRIES]
    for e in flat.tolist():
        j, i = divmod(e, U.shape[1])
        W = U.clone()
        W[j, i] = 0.0
        brute = (f(W) - base).square().sum()
        assert torch.allclose(score[j, i], brute, rtol=1e-10, atol=0), (name, j, i, float(score[j, i]), float(brute))


def test_last_block_down_is_wanda_squared(model):
    U = _weights(model.layers[1])
    c = _c(model, 1)["down_proj"]
    assert torch.equal(c, torch.ones(HID, dtype=torch.float64))
    d = torch.rand(INTER, dtype=torch.float64)
    assert torch.allclose(foresight_scores(U["down_proj"], d, c), wanda_scores(U["down_proj"], d).square())


def test_v_group_modes(model):
    U = _weights(model.layers[0])
    c_sum = _c(model, 0)["v_proj"]
    c_sn = _c(model, 0, v_group="sum_of_norms")["v_proj"]
    o = U["o_proj"]
    for g in range(G_):
        for t in range(HD):
            heads = [h for h in range(H_) if h // (H_ // G_) == g]
            col_sum = sum(o[:, h * HD + t] for h in heads)
            assert torch.isclose(c_sum[g * HD + t], col_sum.square().sum(), rtol=1e-12)
            assert torch.isclose(c_sn[g * HD + t], sum(o[:, h * HD + t].square().sum() for h in heads), rtol=1e-12)
    # without GQA the two coincide
    Ung = {"v_proj": torch.randn(8, 5, dtype=torch.float64), "o_proj": torch.randn(3, 8, dtype=torch.float64)}
    a = consumer_factors(Ung, 4, 4, names=["v_proj"])
    b = consumer_factors(Ung, 4, 4, names=["v_proj"], v_group="sum_of_norms")
    assert list(a) == ["v_proj"] and torch.allclose(a["v_proj"], b["v_proj"])


def test_exact_scores_helper(model):
    U = _weights(model.layers[1])
    d = {n: torch.rand(w.shape[1], dtype=torch.float64) for n, w in U.items()}
    out = foresight_exact_scores(U, d, H_, G_, mlp_norm_weight=model.layers[1].post_attention_layernorm.weight.detach())
    c = _c(model, 1)
    for n in U:
        assert torch.allclose(out[n], U[n].square() * d[n][None, :] * c[n][:, None])
    with pytest.raises(StatisticsError, match="q_proj"):
        foresight_exact_scores(U, {k: v for k, v in d.items() if k != "q_proj"}, H_, G_)


def _reference_oracle(U, d, n_tok, H, G):
    """Per-element loops of paper.md §3.2's table (independent of the vectorised code)."""
    rep = H // G
    hd = U["q_proj"].shape[0] // H
    xh = {k: (v / n_tok).sqrt() for k, v in d.items()}
    out = {k: torch.zeros_like(v) for k, v in U.items()}
    Q, K, V, O = U["q_proj"], U["k_proj"], U["v_proj"], U["o_proj"]
    Gt, Up, Dn = U["gate_proj"], U["up_proj"], U["down_proj"]
    for j in range(Q.shape[0]):
        h, t = divmod(j, hd)
        g = h // rep
        for i in range(Q.shape[1]):
            kn = sum(K[g * hd + tt, i] ** 2 for tt in range(hd)) ** 0.5
            out["q_proj"][j, i] = abs(Q[j, i]) * kn * xh["q_proj"][i]
    for j in range(K.shape[0]):
        g, t = divmod(j, hd)
        for i in range(K.shape[1]):
            ms = sum(sum(Q[h * hd + tt, i] ** 2 for tt in range(hd)) for h in range(g * rep, (g + 1) * rep)) / rep
            out["k_proj"][j, i] = abs(K[j, i]) * ms ** 0.5 * xh["k_proj"][i]
            ov = sum(O[:, h * hd + t].square().sum() for h in range(g * rep, (g + 1) * rep)) / rep
            out["v_proj"][j, i] = abs(V[j, i]) * ov ** 0.5 * xh["v_proj"][i]
    for j in range(O.shape[0]):
        f = (Gt[:, j].norm() + Up[:, j].norm()) / 2
        for i in range(O.shape[1]):
            out["o_proj"][j, i] = abs(O[j, i]) * xh["o_proj"][i] * f
    for name, W in (("gate_proj", Gt), ("up_proj", Up)):
        for j in range(W.shape[0]):
            for i in range(W.shape[1]):
                out[name][j, i] = abs(W[j, i]) * Dn[i, :].norm() * xh[name][i]
    for j in range(Dn.shape[0]):
        for i in range(Dn.shape[1]):
            out["down_proj"][j, i] = abs(Dn[j, i]) * xh["down_proj"][i]
    return out


def test_reference_scores_match_table():
    torch.manual_seed(1)
    H, G, hd, hid, inter = 4, 2, 2, 8, 6
    shapes = {"q_proj": (H * hd, hid), "k_proj": (G * hd, hid), "v_proj": (G * hd, hid), "o_proj": (hid, H * hd),
              "gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    U = {n: torch.randn(*s, dtype=torch.float64) for n, s in shapes.items()}
    d = {n: torch.rand(s[1], dtype=torch.float64) * 10 for n, s in shapes.items()}
    got = foresight_reference_scores(U, d, 7, H, G)
    want = _reference_oracle(U, d, 7, H, G)
    for n in shapes:
        assert torch.allclose(got[n], want[n], rtol=1e-12, atol=0), n


def test_consumer_errors():
    U = {"q_proj": torch.randn(8, 4), "k_proj": torch.randn(4, 4)}
    with pytest.raises(ConfigError, match="qq_proj"):
        consumer_factors({**U, "qq_proj": torch.randn(2, 2)}, 4, 2)
    with pytest.raises(ModelStructureError, match="k_proj"):
        consumer_factors({"q_proj": U["q_proj"]}, 4, 2)
    with pytest.raises(ModelStructureError, match="o_proj"):
        consumer_factors({"v_proj": torch.randn(4, 4)}, 4, 2)
    with pytest.raises(ConfigError, match="multiple"):
        consumer_factors(U, 4, 3)
    with pytest.raises(ConfigError, match="names"):
        consumer_factors(U, 4, 2, names=["v_proj"])
    with pytest.raises(ConfigError, match="v_group"):
        consumer_factors(U, 4, 2, v_group="bad")
    with pytest.raises(ModelStructureError, match="k_proj"):
        consumer_factors({"q_proj": U["q_proj"], "k_proj": torch.randn(6, 4)}, 4, 2)
    down = {"down_proj": torch.randn(4, 6)}
    with pytest.raises(ModelStructureError, match="next_U.*gate_proj"):
        consumer_factors(down, 4, 2, next_U={"q_proj": torch.randn(8, 4), "k_proj": torch.randn(4, 4),
                                             "v_proj": torch.randn(4, 4), "up_proj": torch.randn(6, 4)})
    with pytest.raises(StatisticsError, match="k_proj"):
        consumer_factors({"q_proj": U["q_proj"], "k_proj": torch.full((4, 4), float("nan"))}, 4, 2)
    with pytest.raises(StatisticsError, match="n_tokens"):
        foresight_reference_scores({"down_proj": torch.randn(4, 6)}, {"down_proj": torch.rand(6)}, 0, 4, 2)
