"""Rank functions for tests/train/test_zero3_real.py (spawned by tests/distributed/harness.py)."""
from __future__ import annotations

import hashlib


def param_digests(model, gather) -> dict[str, str]:
    """sha256 of every parameter's bytes (fp32), each materialised with ``gather``."""
    import torch

    out = {}
    for name, p in model.named_parameters():
        with gather([p]):
            out[name] = hashlib.sha256(p.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
    return out


def load_partitioned(rank, world, model_cfg: dict, ds_path: str):
    """Load through the pipeline's ZeRO-3 path; report partitioning, zero.Init state, digests, and
    that a plain model can then be built on rank 0 alone (the export's situation) without a hang."""
    import json

    import deepspeed
    from transformers import AutoModelForCausalLM

    from xpert_dist.config import ModelConfig
    from xpert_dist.distributed.comm import init_distributed
    from xpert_dist.distributed.zero import partitioned_loading, zero3_init_enabled
    from xpert_dist.models.loading import load_model

    init_distributed()
    ds = json.loads(open(ds_path).read())
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world)
    with partitioned_loading(ds):
        inside = zero3_init_enabled()
        model = load_model(ModelConfig(**model_cfg))
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    after = zero3_init_enabled()
    digests = param_digests(model, lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=None))
    built_alone = None
    if rank == 0:  # what export does: a plain model on one rank; under a live zero.Init this hangs
        plain = AutoModelForCausalLM.from_config(model.config)
        built_alone = not any(hasattr(p, "ds_id") for p in plain.parameters())
    import torch.distributed as dist

    dist.barrier()
    return {"inside": inside, "after": after, "partitioned": partitioned, "digests": digests,
            "built_alone": built_alone}
