"""Merge LoRA into the base and export a Hugging Face checkpoint, the masks and the adapter.

The merged weight of every pruned matrix is checked against its mask before anything is written:
pruned entries must be exactly zero (merging never re-densifies) and the count must be the
target's. Everything is written into a temporary directory and renamed into place.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..distributed.context import DistContext
from ..errors import XpertError
from ..models import structure as st
from ..utils.atomic import atomic_dir

log = logging.getLogger(__name__)


class SparsityCheckError(XpertError, RuntimeError):
    """The merged model does not have the masks' sparsity."""


def merged_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Full, merged (W + s·B·A) state dict with plain ``transformers`` names, on every rank's CPU.

    Gathers one module at a time under ZeRO-3, so peak memory is one module beyond the shards.
    """
    inner = st.unwrap(model)
    sd: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    seen: set[int] = set()
    for name, module in inner.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        quantized = st.quantization_of(module) is not None
        if hasattr(module, "base_layer") or quantized:  # a peft LoRA layer (merge it) or a bnb layer
            skip.add(name)
            base = st.base_linear(module)
            dtype = torch.float32 if quantized else base.weight.dtype
            with ctx.gather(list(module.parameters())):
                sd[f"{name}.weight"] = st.effective_weight(module, dtype=torch.float32).to(dtype).cpu()
                if base.bias is not None:
                    sd[f"{name}.bias"] = base.bias.detach().clone().cpu()
            continue
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        with ctx.gather([p for _, p in params]):
            for n, p in params:
                seen.add(id(p))
                sd[f"{name}.{n}" if name else n] = p.detach().clone().cpu()
    return sd


def check_sparsity(sd: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                   expected: dict[str, float] | None = None) -> dict[str, float]:
    """Per-matrix fraction of zeros; raises if a pruned entry is non-zero or a count is off."""
    out = {}
    for name, keep in masks.items():
        W = sd[f"{name}.weight"]
        if W.shape != keep.shape:
            raise SparsityCheckError(f"{name}: weight shape {tuple(W.shape)} != mask shape {tuple(keep.shape)}")
        leaked = int((W[~keep] != 0).sum())
        if leaked:
            raise SparsityCheckError(f"{name}: {leaked} pruned entries are non-zero after merging")
        if expected is not None and name in expected:
            want = round(expected[name] * keep.numel())
            got = int((~keep).sum())
            if got != want:
                raise SparsityCheckError(f"{name}: {got} pruned entries, expected {want}")
        out[name] = float((W == 0).sum()) / W.numel()
    return out


def save_hf_checkpoint(sd: dict[str, torch.Tensor], model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write ``sd`` as a safetensors checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads."""
    from transformers import AutoModelForCausalLM

    from ..distributed.zero import zero3_init_enabled

    if zero3_init_enabled():  # from_config would become a collective on this one rank (a hang)
        raise XpertError("export: DeepSpeed zero.Init is still enabled (an HfDeepSpeedConfig outlived the "
                         "model load); load under distributed.zero.partitioned_loading")
    config = copy.deepcopy(st.unwrap(model).config)
    if getattr(config, "quantization_config", None) is not None:  # QLoRA base: the export is dense
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(sd, strict=False, assign=True)
    if unexpected:
        raise XpertError(f"export: unexpected keys {unexpected[:5]}")
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise XpertError(f"export: missing keys {sorted(set(missing) - tied)[:5]}")
    if tied:
        plain.tie_weights()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
    log.info("exported merged model to %s", out_dir)
    return out_dir


def save_masks(masks: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    from ..utils.atomic import atomic_write_bytes

    tmp = Path(path).with_suffix(".partial")
    save_file({k: v.to(torch.bool).contiguous() for k, v in masks.items()}, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


def save_adapter(model: nn.Module, ctx: DistContext, out_dir: str | Path) -> None:
    """The LoRA adapter (gathered), as a peft adapter directory."""
    sd = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            with ctx.gather([p]):
                sd[name] = p.detach().clone().cpu()
    if ctx.rank == 0:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=sd)
