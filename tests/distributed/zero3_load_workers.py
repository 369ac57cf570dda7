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


def save_plain_on_every_rank(rank, world, folder: str):
    """Each rank of an initialised gloo group writes a plain checkpoint of the same tiny model into its own folder
    (what gguf_plain_copy does on every rank) and reports the files written and the reloaded weights' digests."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import ByteTokenizer, load_model, save_plain_checkpoint

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_model(ModelConfig(tiny={"num_hidden_layers": 1, "tie_word_embeddings": True}), seed=0)
        target = Path(folder) / f"rank{rank}"

        class Tok(ByteTokenizer):  # the stub tokenizer saves nothing; the checkpoint's own files are the question
            def save_pretrained(self, d):
                return None

        save_plain_checkpoint(model, Tok(model.config.vocab_size), target)
        from transformers import AutoModelForCausalLM

        back = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        import contextlib

        return {"files": sorted(p.name for p in target.iterdir()),
                "digests": param_digests(back, lambda _ps: contextlib.nullcontext()),
                "want": param_digests(model, lambda _ps: contextlib.nullcontext())}
    finally:
        dist.destroy_process_group()
