"""Helpers shared by tests (importable: pytest.ini puts tests/ on sys.path)."""
from __future__ import annotations

import socket
from pathlib import Path

from xpert_dist.prune.pruner import Pruner

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_model(seed: int = 0, **overrides):
    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import load_model

    return load_model(ModelConfig(tiny=overrides), seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora_model():
    """A tiny Llama with LoRA (r=4) whose B is random (so effective weights differ from the base), eval mode."""
    import torch

    from xpert_dist.config import LoraSettings
    from xpert_dist.models.lora import wrap_lora

    model = wrap_lora(tiny_model(), LoraSettings(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def q0(model):
    """Block 0's q_proj."""
    from xpert_dist.models import structure as st

    return st.block_linears(st.blocks(model)[0], ["q_proj"])["q_proj"]


def block0_hessian(model, ids):
    """sum XᵀX of block 0's q_proj input over the calibration ids (float64), by a forward hook."""
    import torch

    H = torch.zeros(q0(model).in_features, q0(model).in_features, dtype=torch.float64)

    def hook(_m, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        H.add_(x.t() @ x)

    h = q0(model).register_forward_pre_hook(hook)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return H



class Recording(Pruner):
    """A Pruner that keeps the statistics each block was pruned with (``seen[step][block][group]``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[dict[int, dict]] = []

    def step(self, *a, **kw):
        self.seen.append({})
        return super().step(*a, **kw)

    def prune_block(self, model, i, block, stats, sparsity, **kw):
        self.seen[-1][i] = {g: s.sum.clone() for g, s in stats.items()}
        return super().prune_block(model, i, block, stats, sparsity, **kw)
