"""Adapter reset at prune steps (``prune.adapter_reset``, METHOD.md training step 2).

After a prune step has merged ``s·B·A`` into the base, every LoRA adapter restarts as peft
initialises it: ``A ~ U(−1/√in, 1/√in)`` (peft's ``kaiming_uniform_(a=√5)``), ``B = 0``, and the
optimizer's Adam moments of ``A`` and ``B`` are zeroed. ``A`` is drawn from a generator seeded by
(``seed``, module index), the same on every rank. Writes go through the DistContext (ZeRO-3
partitions and fp32 masters); DeepSpeed's moments through ``safe_set_full_optimizer_state``.

Plain torch drops the parameters' AdamW state, so their step count (bias correction) restarts too;
DeepSpeed keeps one step count per flat parameter group, so there only the moments restart.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed.context import DistContext
from ..models import structure as st


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft LoRA layer of ``model`` in module order."""
    return [m for _, m in st.unwrap(model).named_modules() if st.lora_parts(m) is not None]


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def reset_adapters(model: nn.Module, engine, ctx: DistContext, seed: int) -> int:
    """Re-initialise every adapter (A fresh, B = 0) and zero its optimizer moments; returns the count."""
    layers = lora_layers(model)
    for k, m in enumerate(layers):
        A, B, _ = st.lora_parts(m)
        r, n_in = full_shape(A)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_033 + k)
        bound = 1.0 / math.sqrt(n_in)
        new_A = (torch.rand(r, n_in, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * bound
        ctx.write_trainable(A, new_A.to(torch.float32))
        ctx.write_trainable(B, torch.zeros(full_shape(B)))
        reset_moments(engine, (A, B))
    return len(layers)


def reset_moments(engine, params) -> None:
    """Zero the Adam moments of ``params`` (plain torch: forget their state; DeepSpeed: set them to 0)."""
    if not getattr(engine, "deepspeed", False):
        for p in params:
            engine.optimizer.state.pop(p, None)
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, torch.zeros(full_shape(p)), key)
