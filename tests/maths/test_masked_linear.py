"""maths/masked_linear: the fused masked LoRA linear against the plain autograd graph of
``x Wᵀ + b + s·xd ((BA)⊙M)ᵀ`` in float64 (outputs and every gradient), merged and split forms."""
import pytest
import torch

from xpert_dist.maths.bits import pack_bits
from xpert_dist.maths.masked_linear import masked_lora_linear


def _case(seed, out=7, inp=13, r=3, tokens=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out, inp, generator=g) > 0.4
    W = torch.randn(out, inp, generator=g, dtype=torch.float64) * keep  # the base is already pruned
    b = torch.randn(out, generator=g, dtype=torch.float64)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    x = torch.randn(*tokens, inp, generator=g, dtype=torch.float64)
    xd = torch.randn(*tokens, inp, generator=g, dtype=torch.float64)  # stands for dropout(x)
    gy = torch.randn(*tokens, out, generator=g, dtype=torch.float64)
    return keep, W, b, A, B, x, xd, gy


def _grads(fn, tensors, gy):
    ts = [t.clone().requires_grad_(True) for t in tensors]
    y = fn(*ts)
    y.backward(gy)
    return y.detach(), [t.grad for t in ts]


@pytest.mark.parametrize("implicit", [False, True], ids=["bits", "support"])
@pytest.mark.parametrize("merged", [True, False])
def test_matches_float64_autograd_oracle(merged, implicit):
    """``implicit``: no bits, the mask is read from the base weight's support (W != 0)."""
    keep, W, b, A, B, x, xd, gy = _case(0)
    s = 0.75
    bits = None if implicit else pack_bits(keep)

    def oracle(x_, xd_, A_, B_, b_):
        delta = (B_ @ A_) * keep * s
        return x_ @ W.t() + b_ + (x_ if merged else xd_) @ delta.t()

    def fused(x_, xd_, A_, B_, b_):
        return masked_lora_linear(x_, None if merged else xd_, W, b_, A_, B_, bits, keep.shape, s)

    y_ref, g_ref = _grads(oracle, [x, xd, A, B, b], gy)
    y, g = _grads(fused, [x, xd, A, B, b], gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    names = ["x", "xd", "A", "B", "bias"]
    for name, got, ref in zip(names, g, g_ref):
        if merged and name == "xd":
            assert got is None and ref is None
            continue
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=f"grad {name}")


def test_pruned_positions_get_no_adapter_gradient():
    """The gradient of the merged weight W + s(BA)⊙M w.r.t. BA vanishes off the mask: a step on A, B
    never changes the pruned entries of the merged weight."""
    keep, W, b, A, B, x, _, gy = _case(1)
    bits = pack_bits(keep)
    A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    masked_lora_linear(x, None, W, None, A_, B_, bits, keep.shape, 1.0).backward(gy)
    # the adapter gradients equal those of a loss that sees BA only through its kept entries
    ref = ((gy.reshape(-1, 7).t() @ x.reshape(-1, 13)) * keep)
    torch.testing.assert_close(B_.grad, ref @ A.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A_.grad, B.t() @ ref, rtol=1e-12, atol=1e-12)


def test_float32_close_to_float64():
    keep, W, b, A, B, x, _, gy = _case(2, out=64, inp=96, r=8, tokens=(4, 16))
    bits = pack_bits(keep)
    y64 = masked_lora_linear(x, None, W, b, A, B, bits, keep.shape, 2.0)
    y32 = masked_lora_linear(x.float(), None, W.float(), b.float(), A.float(), B.float(), bits, keep.shape, 2.0)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_bfloat16_weight_gradient_close_to_float64_and_the_rest_exact():
    """``grad_dtype=torch.bfloat16``: only G = gᵀx is computed in bf16. Oracle: the float64 autograd graph;
    the adapter gradients agree to bf16 rounding (and the float32 run is far closer), the output and ∂x
    are bit-identical to the float32 run, and pruned positions still get no gradient."""
    keep, W, b, A, B, x, _, gy = _case(3, out=64, inp=96, r=8, tokens=(4, 32))
    bits, s = pack_bits(keep), 2.0

    def oracle(x_, A_, B_):
        return x_ @ W.t() + b + x_ @ ((B_ @ A_) * keep * s).t()

    _, (gx64, gA64, gB64) = _grads(oracle, [x, A, B], gy)
    runs = {}
    for gd in (None, torch.bfloat16):
        runs[gd] = _grads(lambda x_, A_, B_: masked_lora_linear(x_, None, W.float(), b.float(), A_, B_, bits,
                                                                keep.shape, s, grad_dtype=gd),
                          [x.float(), A.float(), B.float()], gy.float())
    (y32, (gx32, gA32, gB32)), (ybf, (gxbf, gAbf, gBbf)) = runs[None], runs[torch.bfloat16]
    assert torch.equal(ybf, y32) and torch.equal(gxbf, gx32)
    for got, ref, ref32 in ((gAbf, gA64, gA32), (gBbf, gB64, gB32)):
        err, err32 = float((got.double() - ref).abs().max()), float((ref32.double() - ref).abs().max())
        scale = float(ref.abs().max())
        assert err <= 2e-2 * scale, (err, scale)
        assert err32 < err / 10  # bf16 is what moved the gradient
    # the gradient of BA's pruned entries stays 0: the bf16 G is masked like the float32 one
    A_, B_ = A.float().clone().requires_grad_(True), B.float().clone().requires_grad_(True)
    masked_lora_linear(x.float(), None, W.float(), None, A_, B_, bits, keep.shape, 1.0,
                       grad_dtype=torch.bfloat16).backward(gy.float())
    G = (gy.float().reshape(-1, 64).t().bfloat16() @ x.float().reshape(-1, 96).bfloat16()).float() * keep
    torch.testing.assert_close(B_.grad, G @ A.float().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged", [True, False])
def test_straight_through_gradients_are_plain_loras_of_the_masked_forward(merged):
    """``straight_through=True``: output and ∂x, ∂xd, ∂bias as the exact masked linear's; the adapter's gradients
    those of a dense delta at the masked forward's upstream gradient. Oracle: float64 autograd through
    ``s·BA + (s·(BA)⊙M − s·BA).detach()`` (the straight-through estimator), and, independently, the
    hand-written plain LoRA formulas ``∂B = s gᵀ(xd Aᵀ)``, ``∂A = s (g B)ᵀ xd``."""
    keep, W, b, A, B, x, xd, gy = _case(4)
    s = 0.75
    bits = pack_bits(keep)

    def oracle(x_, xd_, A_, B_, b_):
        dense = (B_ @ A_) * s
        delta = dense + (dense * keep - dense).detach()
        return x_ @ W.t() + b_ + (x_ if merged else xd_) @ delta.t()

    def fused(st):
        return lambda x_, xd_, A_, B_, b_: masked_lora_linear(x_, None if merged else xd_, W, b_, A_, B_, bits,
                                                             keep.shape, s, straight_through=st)

    y_ref, g_ref = _grads(oracle, [x, xd, A, B, b], gy)
    y, g = _grads(fused(True), [x, xd, A, B, b], gy)
    y_exact, g_exact = _grads(fused(False), [x, xd, A, B, b], gy)
    assert torch.equal(y, y_exact)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, got, ref, exact in zip(["x", "xd", "A", "B", "bias"], g, g_ref, g_exact):
        if merged and name == "xd":
            assert got is None and ref is None
            continue
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=f"grad {name}")
        if name in ("A", "B"):  # the estimator is what differs from the exact gradient
            assert float((got - exact).abs().max()) > 1e-3
        else:
            assert torch.equal(got, exact)
    a_in, g2 = (x if merged else xd).reshape(-1, 13), gy.reshape(-1, 7)
    torch.testing.assert_close(g[3], s * g2.t() @ (a_in @ A.t()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g[2], s * (g2 @ B).t() @ a_in, rtol=1e-12, atol=1e-12)
