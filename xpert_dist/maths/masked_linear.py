"""The masked LoRA linear as one autograd function: ``y = x Wᵀ + s·xd ((B A) ⊙ M)ᵀ``, tensors in, tensors out.

``W`` is the frozen base weight (already zero off the keep mask ``M``), ``A [r, in]``, ``B [out, r]`` the
adapter, ``s`` its scaling, ``xd`` the adapter's input (``x`` after LoRA dropout). Two forms, one result:

- **merged** (``xd is None``: no dropout, or eval): one matmul with ``W + s·(BA)⊙M``; the backward does two
  (``∂x = g W_eff`` and ``G = gᵀ x``): 3 full ``[tokens × out × in]`` matmuls per step instead of the
  5 of the split autograd graph below;
- **split** (dropout active): ``x Wᵀ`` and ``xd Dᵀ`` as two matmuls (the inputs differ), 5 in all.

Neither form keeps the ``[out, in]`` masked delta alive between forward and backward: the backward
recomputes it from ``A``, ``B`` and the bit-packed mask (``out·in·r`` multiply-adds, ``1/tokens`` of a
matmul), so the masked phase holds no more activations than plain LoRA. The adapter's gradients are
``∂B = s (G⊙M) Aᵀ`` and ``∂A = s Bᵀ (G⊙M)``. The base weight is frozen (no gradient).

Parameters are read from ``ctx`` attributes, not ``save_for_backward``, so a ZeRO-3 engine's re-gather
before the module's backward is what the backward sees.

``grad_dtype``: the dtype of the one matmul the masked adapter adds to plain LoRA's step, ``G = gᵀ x``
(``prune.masked_grad_dtype``; None: A's dtype). ``torch.bfloat16`` halves its cost on CPUs with bf16
matmul units at bf16's rounding of ``G`` (~3 significant digits); the forward and ``∂x`` stay exact.

``straight_through``: the adapter's gradients as if its delta were dense, ``∂B = s gᵀ(x Aᵀ)`` and
``∂A = s (g B)ᵀ x`` (plain LoRA's, ``r·tokens·(out + in)`` multiply-adds), instead of the exact
``∂B = s (G⊙M) Aᵀ``, ``∂A = s Bᵀ (G⊙M)``: no ``G`` matmul, so a masked step costs what a plain LoRA step
costs; the forward, ``∂x`` and hence the trained model stay exactly masked (only the update direction
ignores the mask, as a straight-through estimator does). ``prune.masked_grad``.

``bits=None``: the mask is the base weight's support, ``M = (W != 0)`` (valid when ``W`` is exactly zero
off the mask and non-zero on it; the caller checks that once). Nothing is stored per module, and under
ZeRO-3 the mask is partitioned with the weight it is read from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bits import unpack_bits

__all__ = ["masked_lora_linear"]


def _keep(weight: Tensor, bits: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """The bool keep mask: unpacked from ``bits``, or the support of ``weight`` (``bits=None``)."""
    return weight != 0 if bits is None else unpack_bits(bits, shape)


def _delta(A: Tensor, B: Tensor, keep: Tensor, scaling: float) -> Tensor:
    """``s·(BA)⊙M`` (``keep`` bool): the scaling goes into the ``[out, r]`` factor, the mask multiplies in
    place, so the ``[out, in]`` matrix is written once and read-modified once."""
    return ((B * scaling) @ A).mul_(keep)


def _merged(weight: Tensor, delta: Tensor) -> Tensor:
    """``W + s·(BA)⊙M``, in place in ``delta``'s buffer (``W`` is not touched)."""
    return delta.add_(weight.to(delta.dtype))


class _MaskedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, weight, bias, A, B, bits, shape, scaling, grad_dtype, straight_through):
        delta = _delta(A, B, _keep(weight, bits, shape), scaling)
        if xd is None:
            y = F.linear(x, _merged(weight, delta), bias)
        else:
            y = F.linear(x, weight, bias) + F.linear(xd, delta)
        # the adapter's input is all the backward needs (∂x comes from the weights and g)
        ctx.save_for_backward(x if xd is None else xd, bits)  # bits None: a None slot
        ctx.merged, ctx.shape, ctx.scaling, ctx.grad_dtype = xd is None, shape, scaling, grad_dtype
        ctx.straight_through = straight_through
        ctx.weight, ctx.A, ctx.B = weight, A, B
        return y

    @staticmethod
    def backward(ctx, g):
        a_in, bits = ctx.saved_tensors
        A, B, weight, s = ctx.A, ctx.B, ctx.weight, ctx.scaling
        keep = _keep(weight, bits, ctx.shape)
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            delta = _delta(A, B, keep, s)
            if ctx.merged:
                grad_x = g @ _merged(weight, delta).to(g.dtype) if ctx.needs_input_grad[0] else None
            else:
                grad_x = g @ weight.to(g.dtype) if ctx.needs_input_grad[0] else None
                grad_xd = g @ delta.to(g.dtype) if ctx.needs_input_grad[1] else None
            del delta
        a2 = a_in.reshape(-1, a_in.shape[-1])
        if ctx.straight_through:  # plain LoRA's gradients: s·(gB)ᵀx and s·gᵀ(xAᵀ), no [out, in] matrix
            g2a = g2.to(A.dtype)
            grad_A = (g2a @ (B * s)).t() @ a2.to(A.dtype) if ctx.needs_input_grad[4] else None
            grad_B = g2a.t() @ (a2.to(A.dtype) @ (A * s).t()) if ctx.needs_input_grad[5] else None
        else:
            gd = ctx.grad_dtype or A.dtype
            G = (g2.t().to(gd) @ a2.to(gd)).to(A.dtype).mul_(keep)  # G⊙M, unscaled
            grad_A = (B * s).t() @ G if ctx.needs_input_grad[4] else None  # s·Bᵀ(G⊙M)
            grad_B = G @ (A * s).t() if ctx.needs_input_grad[5] else None  # s·(G⊙M)Aᵀ
        grad_bias = g2.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None, None, None, None, None


def masked_lora_linear(x: Tensor, xd: Tensor | None, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                       bits: Tensor | None, shape: tuple[int, int], scaling: float,
                       grad_dtype: torch.dtype | None = None, straight_through: bool = False) -> Tensor:
    """``x Wᵀ + b + s·xd ((BA)⊙M)ᵀ`` (``xd None``: ``xd = x``, merged into one matmul); ``bits`` is the keep
    mask packed by :func:`xpert_dist.maths.bits.pack_bits` for ``shape = (out, in)``, or None for
    ``M = (W != 0)``. Gradients flow to
    ``x``, ``xd``, ``bias``, ``A`` and ``B``; ``weight`` is treated as frozen. ``grad_dtype``,
    ``straight_through``: see the module docstring."""
    return _MaskedLoRALinear.apply(x, xd, weight, bias, A, B, bits, tuple(shape), float(scaling), grad_dtype,
                                   bool(straight_through))
