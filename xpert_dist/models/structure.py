"""Where the prunable linears of a Llama-family model are, and their effective (LoRA-merged) weights.

Works on a plain ``transformers`` model and on a ``peft``-wrapped one. Families with the Llama
block layout (Llama, Qwen2/3, Mistral) are supported; anything else raises ModelStructureError,
because the ForeSight consumer map is only defined for that layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LLAMA_LINEARS
from ..errors import ModelStructureError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# modules that read the same input tensor share one XᵀX
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


@dataclass(frozen=True)
class Geometry:
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


def unwrap(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` inside a peft / DeepSpeed wrapper."""
    inner = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def check_family(model: nn.Module) -> None:
    mt = getattr(unwrap(model).config, "model_type", None)
    if mt not in SUPPORTED_FAMILIES:
        raise ModelStructureError(f"model type {mt!r} has no consumer map; supported: {', '.join(SUPPORTED_FAMILIES)}")


def geometry(model: nn.Module) -> Geometry:
    c = unwrap(model).config
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return Geometry(c.num_hidden_layers, c.hidden_size, c.intermediate_size, n_heads,
                    getattr(c, "num_key_value_heads", None) or n_heads, head_dim)


def blocks(model: nn.Module) -> nn.ModuleList:
    check_family(model)
    return unwrap(model).model.layers


def block_linears(block: nn.Module, names=LLAMA_LINEARS) -> dict[str, nn.Module]:
    """Short name -> the (possibly LoRA-wrapped) linear module of one decoder block."""
    out = {}
    for n in names:
        parent = block.self_attn if n in ATTN else block.mlp
        if not hasattr(parent, n):
            raise ModelStructureError(f"module {n!r} not found in block {type(block).__name__}")
        out[n] = getattr(parent, n)
    return out


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen base Linear of a peft LoRA layer (or the module itself)."""
    return getattr(module, "base_layer", module)


def lora_parts(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, float] | None:
    """(A weight [r,in], B weight [out,r], scale) of the active adapter, or None for a plain Linear."""
    if not hasattr(module, "lora_A"):
        return None
    names = [a for a in module.active_adapters if a in module.lora_A]
    if not names:
        return None
    a = names[0]
    return module.lora_A[a].weight, module.lora_B[a].weight, float(module.scaling[a])


def quantization_of(module: nn.Module) -> str | None:
    """'4bit' / '8bit' when the base Linear is a bitsandbytes layer (QLoRA), else None."""
    kind = type(getattr(base_linear(module), "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def base_weight(module: nn.Module, dtype=torch.float32) -> torch.Tensor:
    """The base weight as a dense tensor (dequantised for bitsandbytes 4-bit/8-bit layers)."""
    W = base_linear(module).weight
    q = quantization_of(module)
    if q == "4bit":
        import bitsandbytes.functional as bf

        data, state = W.data, W.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bnb repacks for its CPU kernel on first forward
            data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
        return bf.dequantize_4bit(data, state).to(dtype)
    if q == "8bit":
        if getattr(W, "SCB", None) is None:
            return W.data.to(dtype).clone()
        return (W.CB.to(dtype) * W.SCB.to(dtype)[:, None] / 127.0)
    if W.numel() == 0:
        raise ModelStructureError("weight is partitioned (ZeRO-3): gather it before reading")
    return W.detach().to(dtype).clone()


def set_base_weight(module: nn.Module, value: torch.Tensor, write) -> None:
    """Replace the base weight by ``value`` (requantising bitsandbytes layers; NF4 and int8 keep
    exact zeros); ``write(param, value)`` is the DistContext writer for ordinary weights."""
    base = base_linear(module)
    q = quantization_of(module)
    if q is None:
        write(base.weight, value)
        return
    import bitsandbytes as bnb

    old = base.weight
    if q == "4bit":
        new = bnb.nn.Params4bit(value.to(torch.float32).contiguous(), requires_grad=False,
                                quant_type=old.quant_type, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics)
    else:
        new = bnb.nn.Int8Params(value.to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)
    base.weight = new.to(old.device)


def effective_weight(module: nn.Module, dtype=torch.float32) -> torch.Tensor:
    """U = W + s·B·A as a new tensor (parameters must be materialised, e.g. inside a ZeRO-3 gather);
    ``W + s·(B·A)⊙M`` once the module's delta is masked (:func:`xpert_dist.models.lora.mask_delta`)."""
    from .lora import delta_mask

    U = base_weight(module, dtype)
    parts = lora_parts(module)
    if parts is not None:
        A, B, s = parts
        delta = B.detach().to(dtype) @ A.detach().to(dtype)
        keep = delta_mask(module)
        if keep is not None:
            delta = delta * keep.to(device=delta.device, dtype=dtype)
        U += s * delta
    return U


def norm_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_layernorm gain, post_attention_layernorm gain) of a Llama block."""
    return block.input_layernorm.weight.detach().float(), block.post_attention_layernorm.weight.detach().float()
