"""Per-rank bodies of the multi-process tests (importable by spawned children).

Everything returned to the parent is plain Python / numpy (no shared-memory tensors).
Heavy imports stay inside the functions: a child imports this module before it runs anything.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def np_(t):
    return t.detach().cpu().contiguous().numpy().copy()


def calib_ids(n_rows=11, seq=12, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_rows, seq), generator=g)


def build_lora_model(seed: int = 0, r: int = 4):
    """Tiny Llama (hidden 64, 2 blocks, GQA) wrapped with LoRA whose B is non-zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from xpert_dist.models.loading import tiny_llama_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LINEARS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def snapshot(model, ctx=None):
    """{name: numpy} of every base weight and LoRA B (gathered under ZeRO-3)."""
    import contextlib

    from xpert_dist.models import structure as st

    out = {}
    for i, block in enumerate(st.blocks(model)):
        with (ctx.gather(block) if ctx is not None else contextlib.nullcontext()):
            for n, m in st.block_linears(block).items():
                out[f"{i}.{n}.W"] = np_(st.base_linear(m).weight)
                parts = st.lora_parts(m)
                if parts is not None:
                    out[f"{i}.{n}.B"] = np_(parts[1])
    return out


# ----------------------------------------------------------------------------- pure transport
def tree_transport(rank, world, ks, shape):
    """Every rank pushes its shard of K random leaves; the owner's result is returned."""
    import torch

    from xpert_dist.distributed.context import TorchDistContext, from_environment
    from xpert_dist.stats.capture import InputStats
    from xpert_dist.stats.tree import TreeSum

    ctx = from_environment(timeout_s=30)  # WORLD_SIZE=2 in the environment: initialises gloo
    assert isinstance(ctx, TorchDistContext) and ctx.world_size == world and ctx.backend == "gloo"
    out = {}
    for K in ks:
        g = torch.Generator().manual_seed(K)
        leaves = [torch.randn(shape, generator=g) * 10.0 ** (j % 7 - 3) for j in range(K)]
        t = TreeSum()
        for j in ctx.shard(K):
            t.push(j, leaves[j].clone())
        part = InputStats(None, len(ctx.shard(K)), "full", nodes=t.nodes(), span=(t.start, t.stop)) if not t.empty \
            else InputStats(None, 0, "full", nodes=[], span=None)
        res = ctx.reduce_stats({"x": part}, replicate=True)["x"]
        out[K] = (np_(res.sum), res.n)
    out["owned_failure"] = _owner_fn_raises(ctx)
    out["owned_ok"] = {k: np_(v["v"]) for k, v in ctx.compute_owned(
        ["a", "c", "d"], {"a": 3, "c": 2, "d": 1}, lambda k: {"v": torch.full((2,), float(ord(k)))}).items()}
    ctx.close()
    return out


# ----------------------------------------------------------------------------- plain torch.distributed
def stats_and_prune_plain(rank, world, pbs):
    """No ZeRO: every rank holds a replica. Statistics of each block (reduced, owner + remote views)
    and a full one-shot prune (lead's prune(), ForeSight + PBS) through TorchDistContext."""
    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.prune.oneshot import prune
    from xpert_dist.stats.sequential import sequential_calibration, shard_rows

    ctx = TorchDistContext(timeout_s=60)
    ids = calib_ids()
    bs = 2
    K = -(-ids.shape[0] // bs)
    model = build_lora_model()
    stats = {}

    def on_block(i, block, st):
        red = ctx.reduce_stats(st)
        stats[i] = {g: {"n": s.n, "diag": np_(s.diag), "owner": ctx.owner_of(g),
                        "sum": np_(s.sum) if s.resident else None} for g, s in red.items()}

    local = ctx.shard(K)
    sequential_calibration(model, shard_rows(ids, bs, local), on_block, mode="full", batch_size=bs,
                           progress=False, batch_indices=local, ctx=ctx)
    model = build_lora_model()
    rep = prune(model, "foresight", 0.5, ids, ctx=ctx, batch_size=bs, progress=False, pbs=pbs)
    snap = snapshot(model)
    ctx.barrier()
    ctx.close()
    return {"stats": stats, "weights": snap, "mask_sha256": rep.mask_sha256}


# ----------------------------------------------------------------------------- ZeRO-3 (DeepSpeed)
def resolved_ds_config(name="zero3.json", micro_batch=2, lr=0.0, threshold=0, world=2, dtype="float32"):
    """A shipped DeepSpeed JSON resolved the way the training pipeline resolves it ("auto" fields
    filled from the run config), then adjusted for the tests (lr, persistence threshold)."""
    from xpert_dist.config import ModelConfig, RunConfig, TrainConfig
    from xpert_dist.train.engine import load_ds_config

    cfg = RunConfig(ds_config=str(REPO / "ds_configs" / name), model=ModelConfig(dtype=dtype),
                    train=TrainConfig(batch_size=micro_batch * world, micro_batch_size=micro_batch, lr=1e-3))
    ds = load_ds_config(cfg, world)
    ds["optimizer"]["params"]["lr"] = lr
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    return ds


def zero3_engine(model, lr=0.0, threshold=0, micro_batch=2, name="zero3.json"):
    import deepspeed
    import torch.distributed as dist

    cfg = resolved_ds_config(name, micro_batch, lr, threshold, dist.get_world_size())
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def zero3_stats_prune(rank, world, pbs):
    """2-rank ZeRO-3: the model is partitioned; statistics through the ambient context (no ctx passed
    to sequential_calibration), a training step first so DeepSpeed has a complete trace, then the
    lead's prune() with ForeSight + PBS, then write_trainable consistency and another step."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.models import structure as st
    from xpert_dist.prune.oneshot import prune
    from xpert_dist.stats.sequential import sequential_calibration, shard_rows

    ctx = TorchDistContext(zero3=True, timeout_s=60)
    engine = zero3_engine(build_lora_model())
    model = engine.module
    W0 = st.base_linear(st.block_linears(st.blocks(model)[0])["q_proj"]).weight
    partitioned = W0.numel() == 0 and tuple(W0.ds_shape) == (64, 64)
    ids = calib_ids()
    x = ids[:2]
    for _ in range(2):  # lr = 0: weights stay equal to the single-process model's
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    bs = 2
    K = -(-ids.shape[0] // bs)
    stats = {}

    def on_block(i, block, s):
        red = ctx.reduce_stats(s, replicate=True)
        stats[i] = {g: {"n": v.n, "sum": np_(v.sum)} for g, v in red.items()}

    sequential_calibration(model, shard_rows(ids, bs, ctx.shard(K)), on_block, mode="full", batch_size=bs,
                           progress=False)  # ambient context: indices, gathers, hook suspension
    rep = prune(model, "foresight", 0.5, ids, ctx=ctx, batch_size=bs, progress=False, pbs=pbs)
    snap = snapshot(model, ctx)

    # write_trainable: partition, gathered copy and fp32 master agree; a zero-gradient step keeps it
    B = st.lora_parts(st.block_linears(st.blocks(model)[1])["up_proj"])[1]
    value = torch.arange(B.ds_numel, dtype=torch.float32).reshape(B.ds_shape) / 1000.0
    ctx.write_trainable(B, value)
    fp32 = safe_get_full_fp32_param(B)
    with ctx.gather([B]):
        after_write = np_(B)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss * 0.0)
    engine.step()
    with ctx.gather([B]):
        after_step = np_(B)
    ctx.barrier()
    ctx.close()
    return {"partitioned": partitioned, "stats": stats, "weights": snap, "mask_sha256": rep.mask_sha256,
            "value": np_(value), "fp32": np_(fp32), "after_write": after_write, "after_step": after_step,
            "loss_finite": bool(torch.isfinite(loss).item())}


# ----------------------------------------------------------------------------- failures
def dies_during_accumulation(rank, world, timeout_s, victim):
    """``victim`` calls os._exit in the middle of its forward passes; the others then reduce."""
    import torch

    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.errors import DistributedError
    from xpert_dist.stats.capture import StatsCollector

    ctx = TorchDistContext(timeout_s=timeout_s)
    ctx.barrier()
    lin = torch.nn.Linear(16, 16)
    K = 4 * world
    with StatsCollector({"down_proj": lin}, mode="full") as col:
        for j, g in enumerate(ctx.shard(K)):
            col.set_batch(g)
            if rank == victim and j == 1:
                os._exit(17)
            lin(torch.randn(3, 16))
    t0 = time.monotonic()
    try:
        ctx.reduce_stats(col.stats())
        ctx.barrier()
    except DistributedError as e:
        return {"error": str(e), "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}


def hangs_in_collective(rank, world, timeout_s):
    """Rank 1 stops answering (sleeps) instead of dying: the others time out with DistributedError."""
    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.errors import DistributedError

    ctx = TorchDistContext(timeout_s=timeout_s)
    ctx.barrier()
    if rank == 1:
        time.sleep(timeout_s + 20)
        os._exit(0)
    t0 = time.monotonic()
    try:
        ctx.all_gather_object(rank, op="test all_gather")
    except DistributedError as e:
        return {"error": str(e), "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}


def _owner_fn_raises(ctx):
    """fn raising on its owner: the owner re-raises it, every other rank gets DistributedError."""
    from xpert_dist.errors import ConfigError, DistributedError

    def fn(k):
        if k == "b":
            raise ConfigError("bad module b")
        import torch

        return {"v": torch.full((2,), float(ord(k)))}

    try:
        ctx.compute_owned(["a", "b", "c"], {"a": 1, "b": 5, "c": 1}, fn)
    except ConfigError as e:
        return ("ConfigError", str(e))
    except DistributedError as e:
        return ("DistributedError", str(e))
    return ("none", "")


def ds_configs_train(rank, world, names):
    """Each shipped config trains (2 steps, LoRA moves) on CPU/gloo, and write_trainable sticks
    through an optimizer step (ZeRO-2 keeps an fp32 master too)."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.models import structure as st

    ctx = TorchDistContext(timeout_s=60)
    out = {}
    x = calib_ids()[:2]
    for name in names:
        model = build_lora_model()
        cfg = resolved_ds_config(name, micro_batch=2, lr=1e-2, threshold=0, world=world)
        engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        A = st.lora_parts(st.block_linears(st.blocks(engine.module)[0])["v_proj"])[0]
        with ctx.gather([A]):
            before = A.detach().clone()
        losses = []
        for _ in range(2):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        with ctx.gather([A]):
            moved = float((A.detach() - before).abs().max())
        value = torch.full(tuple(A.ds_shape) if hasattr(A, "ds_shape") else tuple(A.shape), 0.125)
        ctx.write_trainable(A, value)
        fp32 = safe_get_full_fp32_param(A)
        for g in engine.optimizer.param_groups:
            g["lr"] = 0.0
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss * 0.0)
        engine.step()
        with ctx.gather([A]):
            kept = bool(torch.equal(A.detach().float(), value))
        out[name] = {"losses": losses, "moved": moved, "fp32_ok": bool(torch.equal(fp32.float(), value)),
                     "kept": kept, "offload": bool(cfg["zero_optimization"].get("offload_param"))}
        engine.destroy()
    ctx.close()
    return out


def zero3_staged_prune(rank, world, options):
    """2-rank ZeRO-3: a one-shot prune with staged calibration (``prune.propagate=true_sequential``) through
    the lead's prune(), after two zero-learning-rate training steps (DeepSpeed's trace complete)."""
    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.prune.oneshot import prune

    ctx = TorchDistContext(zero3=True, timeout_s=60)
    engine = zero3_engine(build_lora_model())
    ids = calib_ids()
    x = ids[:2]
    for _ in range(2):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    rep = prune(engine.module, "foresight", 0.5, ids, ctx=ctx, batch_size=2, progress=False, **options)
    snap = snapshot(engine.module, ctx)
    ctx.barrier()
    ctx.close()
    return {"weights": snap, "mask_sha256": rep.mask_sha256}
