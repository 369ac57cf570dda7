"""Wrap a model with peft LoRA on the configured Llama linears; the mask-preserving (masked) adapter.

Masked adapter (METHOD.md, "Decision (project, 2026-12)"): once a module's mask ``M`` is final, its
forward becomes ``W x + s·((B A) ⊙ M) x`` (``W`` already zero off ``M``), so merging ``W + s·(BA)⊙M``
is exactly the trained model and never re-densifies. ``(BA) ⊙ M`` is not low-rank, so the backward
forms the dense gradient ``(s·gᵀ x) ⊙ M`` (``tokens·out·in``, the cost of one dense weight gradient,
which plain LoRA never computes). On a plain ``nn.Linear`` base the forward is the fused function of
``maths/masked_linear.py``: with LoRA dropout inactive (``lora.dropout=0``) one matmul with the merged
``W + s·(BA)⊙M`` (3 full matmuls per step with the backward, against 5 for the unfused graph), and in
both forms the ``[out, in]`` delta is recomputed in the backward instead of being kept. Other bases
(4-bit QLoRA, several active adapters) take the unfused autograd graph. When the base weight is a
float tensor that is exactly zero off the mask and non-zero on it (what a prune step writes; checked
per module when the mask becomes final) the mask is read from it, ``M = (W != 0)``, and nothing is
stored: under ZeRO-3 it is then partitioned with the weight. Otherwise (a quantized base, a kept
weight that is exactly 0) the mask is held beside the module as a bit-packed ``uint8`` buffer (1 bit
per weight, ``numel/8`` bytes, on the module's device, not partitioned by ZeRO-3). Under ZeRO-3 the
LoRA ``A``/``B`` and the base weight are registered as external parameters of the peft layer, whose
forward reads them directly.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraSettings
from ..errors import ConfigError
from ..maths.bits import pack_bits, unpack_bits
from ..maths.masked_linear import masked_lora_linear
from .structure import base_linear

_BITS = "xd_delta_mask_bits"
_SHAPE = "xd_delta_mask_shape"
_IMPLICIT = "xd_delta_mask_implicit"
_GRAD_DTYPE = "xd_delta_grad_dtype"  # the fused path's G = gᵀx dtype (the generic autograd path ignores it)
_STRAIGHT = "xd_delta_straight_through"  # the adapter's gradients ignore the mask (prune.masked_grad)


def wrap_lora(model: nn.Module, cfg: LoraSettings, quantized: bool = False) -> nn.Module:
    """peft LoRA (r, alpha, dropout) on ``cfg.target_modules``; every target must exist in the model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} not found in the model "
                          f"({type(model).__name__})")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def delta_mask(module: nn.Module) -> torch.Tensor | None:
    """The keep mask the module's LoRA delta is trained under (bool ``[out, in]``), or None (dense)."""
    if module.__dict__.get(_IMPLICIT):
        return base_linear(module).weight != 0  # materialised (inside a ZeRO-3 gather)
    bits = getattr(module, _BITS, None)
    if bits is None:
        return None
    return unpack_bits(bits, getattr(module, _SHAPE))


def support_is_mask(module: nn.Module, keep: torch.Tensor) -> bool:
    """Whether ``keep`` can be read from the module's base weight as ``W != 0``: a float weight, exactly
    zero off ``keep`` and non-zero on it (the weight must be materialised)."""
    w = base_linear(module).weight
    if not w.dtype.is_floating_point or tuple(w.shape) != tuple(keep.shape):
        return False
    return bool(torch.equal(w.detach() != 0, keep.to(device=w.device, dtype=torch.bool)))


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_id")


def mask_delta(module: nn.Module, keep: torch.Tensor, implicit: bool = False,
               grad_dtype: torch.dtype | None = None, straight_through: bool = False) -> None:
    """From now on train ``module``'s (a peft LoRA Linear) delta masked by ``keep`` (True = keep).

    ``implicit``: the caller checked :func:`support_is_mask`; the mask is then read from the base weight
    (``W != 0``) at every forward and backward instead of being stored beside the module. ``grad_dtype``:
    the dtype of the adapter's weight-gradient matmul (``maths/masked_linear``; None: the adapter's).
    ``straight_through``: the forward stays masked, the adapter's gradients are plain LoRA's (no weight-gradient
    matmul; ``maths/masked_linear``)."""
    if not hasattr(module, "lora_A"):
        raise ConfigError(f"{type(module).__name__} has no LoRA adapter to mask")
    if getattr(module, "merged", False):
        raise ConfigError("cannot mask the delta of a merged LoRA layer")
    base = base_linear(module)
    if hasattr(module, _BITS):
        delattr(module, _BITS)
    if implicit:
        module.__dict__[_IMPLICIT] = True
    else:
        module.__dict__.pop(_IMPLICIT, None)
        device = base.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        module.register_buffer(_BITS, pack_bits(keep.detach().to(device=device, dtype=torch.bool)), persistent=False)
    setattr(module, _SHAPE, tuple(keep.shape))
    module.__dict__[_GRAD_DTYPE] = grad_dtype
    module.__dict__[_STRAIGHT] = bool(straight_through)
    if "forward" not in module.__dict__:
        module.forward = types.MethodType(_masked_forward, module)
    # the fused forward reads the base weight directly too (no base_layer call)
    params = [base.weight, *(w for name in module.lora_A
                             for w in (module.lora_A[name].weight, module.lora_B[name].weight))]
    for p in params:
        if _is_zero3(p):
            import deepspeed

            deepspeed.zero.register_external_parameter(module, p)


def unmask_delta(module: nn.Module) -> None:
    """Back to the dense LoRA forward (the buffer is dropped)."""
    if hasattr(module, _BITS):
        delattr(module, _BITS)
    module.__dict__.pop(_IMPLICIT, None)
    module.__dict__.pop(_SHAPE, None)
    module.__dict__.pop(_GRAD_DTYPE, None)
    module.__dict__.pop(_STRAIGHT, None)
    module.__dict__.pop("forward", None)


@contextlib.contextmanager
def bypass_zero_deltas(modules: Iterable[nn.Module]) -> Iterator[int]:
    """Inside: every peft LoRA layer among ``modules`` whose active adapters' ``B`` are all exactly zero
    (after a prune step without PBS, or at initialisation) runs its base layer alone. peft would add
    ``s·B(A x) = 0`` to that output: the same values, without the adapter's two matmuls and peft's
    bookkeeping around them. Parameters must be materialised (inside a ZeRO-3 gather); layers with a
    patched forward (a masked delta), merged or without an adapter are left alone. Yields how many
    layers are bypassed."""
    patched = []
    for m in modules:
        if not hasattr(m, "lora_B") or "forward" in m.__dict__ or getattr(m, "merged", False):
            continue
        names = [a for a in m.active_adapters if a in m.lora_B]
        weights = [m.lora_B[a].weight for a in names]
        if not names or any(w.numel() == 0 or bool(torch.count_nonzero(w)) for w in weights):
            continue
        m.forward = base_linear(m).__call__  # a bound method, not a Module: not registered as a child
        patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def masked_delta_weight(module: nn.Module, adapter: str, keep: torch.Tensor,
                        straight_through: bool = False) -> torch.Tensor:
    """``s·(B A) ⊙ M`` of one adapter (differentiable; parameters must be materialised). ``straight_through``:
    the same value, with the gradient of the dense ``s·BA`` (the mask is a constant offset)."""
    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    dense = (B @ A) * module.scaling[adapter]
    masked = dense * keep.to(device=A.device, dtype=A.dtype)
    return dense + (masked - dense).detach() if straight_through else masked


def _fused_path(self, args, kwargs) -> str | None:
    """The one active adapter's name when the fused masked linear applies (a plain ``nn.Linear`` base of a
    float dtype, one adapter, no extra forward arguments), else None (the generic autograd path)."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    base = self.base_layer
    if len(names) != 1 or type(base) is not nn.Linear or args or kwargs or not base.weight.dtype.is_floating_point:
        return None
    return names[0]


def _masked_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft LoRA Linear forward with the delta masked: ``base(x) + dropout(x) @ (s·(BA)⊙M)ᵀ``.

    On a plain ``nn.Linear`` base this is :func:`xpert_dist.maths.masked_linear.masked_lora_linear`: one
    matmul with ``W + s·(BA)⊙M`` when dropout is inactive, and no ``[out, in]`` delta kept for the backward.
    """
    if self.merged:
        raise RuntimeError("a masked LoRA layer must not be merged in place (export merges W + s·(BA)⊙M)")
    if self.disable_adapters:
        return self.base_layer(x, *args, **kwargs)
    name = _fused_path(self, args, kwargs)
    if name is not None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        drop = self.lora_dropout[name]
        dropping = drop.training and getattr(drop, "p", 0.0) > 0
        xin = self._cast_input_dtype(x, A.dtype)
        base = self.base_layer
        y = masked_lora_linear(xin if not dropping else x, drop(xin) if dropping else None, base.weight, base.bias,
                               A, B, getattr(self, _BITS, None), getattr(self, _SHAPE), self.scaling[name],
                               self.__dict__.get(_GRAD_DTYPE), self.__dict__.get(_STRAIGHT, False))
        return y.to(x.dtype)
    result = self.base_layer(x, *args, **kwargs)
    out_dtype = result.dtype
    keep = delta_mask(self)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        A = self.lora_A[name].weight
        xin = self._cast_input_dtype(x, A.dtype)
        delta = masked_delta_weight(self, name, keep, self.__dict__.get(_STRAIGHT, False))
        result = result + F.linear(self.lora_dropout[name](xin), delta)
    return result.to(out_dtype)
