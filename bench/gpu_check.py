"""One prepared GPU check (H200 / any CUDA GPU with >= 40 GB): LoRA steps, an in-loop prune step and a
full-Hessian prune of one block on a Llama-shaped ~7B random-weight model, timed, with peak memory.

No download: the model is built on the ``meta`` device and materialised directly on the GPU in
bf16 with random weights (LLaMA-2-7B shapes: h 4096, MLP 11008, 32 layers, 32 heads, vocab 32000).
Phases (each with ``torch.cuda`` peak-memory counters reset first):

1. ``train_before``: N LoRA steps (r 8 on all seven linears, AdamW) -> seconds per step;
2. ``prune_step``: one in-loop prune step through the real pipeline (``xpert_dist.prune.Pruner``:
   sequential calibration, ForeSight + EMA, masks, PBS diagonal) over all blocks;
3. ``train_after``: N LoRA steps on the pruned model (step time with sparse base weights);
4. ``full_hessian_block``: block 0 only: full XᵀX statistics + ForeSight + PBS full
   (``Pruner.prune_block`` with ``pbs=full``), the 70B-relevant solver path.

Prints one JSON object (also written to ``$OUT/gpu_check.json`` when ``$OUT`` is set) with step
times, prune times, peak allocated/reserved GPU memory per phase, and the memory planner's
prediction for the same configuration. ``--tiny`` runs a 2-block hidden-64 model on the CPU (what
CI may run; seconds). Budget: well under 8 minutes on one H200.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                 tie_word_embeddings=False),
}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: dict, device, dtype, seed: int = 0):
    """Llama on the meta device, materialised on ``device`` with random weights (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)  # buffers were left on meta
    return model, cfg


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __enter__(self):
        import torch

        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        self.sync()
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak_alloc_gib = torch.cuda.max_memory_allocated() / 2 ** 30
            self.peak_reserved_gib = torch.cuda.max_memory_reserved() / 2 ** 30
        else:
            import resource

            self.peak_alloc_gib = self.peak_reserved_gib = None
            self.maxrss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return False

    def record(self, **extra):
        out = {"seconds": round(self.seconds, 3), **extra}
        if self.peak_alloc_gib is not None:
            out["peak_allocated_gib"] = round(self.peak_alloc_gib, 3)
            out["peak_reserved_gib"] = round(self.peak_reserved_gib, 3)
        else:
            out["process_max_rss_gib"] = round(self.maxrss_gib, 3)
        return out


def lora_steps(model, opt, ids, steps: int, timer_device):
    times, losses = [], []
    for s in range(steps):
        x = ids[s % ids.shape[0]]
        t = Timer(timer_device)
        with t:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(t.seconds)
        losses.append(float(loss.detach()))
        del loss
    return times, losses


def planner_prediction(shape: dict, args) -> dict:
    from xpert_dist.plan.memory import GiB, PlanSpec, estimate
    from xpert_dist.plan.shapes import ModelShape

    spec = PlanSpec(model=ModelShape.from_config(shape, name="llama-7b-shape"), nodes=1, gpus_per_node=1,
                    gpu_mem_gb=141, host_mem_gb=1024, zero_stage=0, method="foresight", pbs="full",
                    lora_r=8, lora_dropout=0.0, seq_len=args.seq, micro_batch=args.batch,
                    calib_samples=args.calib_samples, calib_batch=args.batch, dtype="bfloat16",
                    grad_checkpointing=args.grad_checkpointing)
    plan = estimate(spec)
    return {"train_peak_gib": round(plan.peaks["train"]["accel"] / GiB, 2),
            "prune_peak_gib": round(plan.peaks["prune"]["accel"] / GiB, 2),
            "note": "planner with ZeRO stage 0 on one GPU, incl. 1.5 GiB CUDA context and x1.10 allocator slack"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-block hidden-64 model on the CPU (CI smoke test)")
    ap.add_argument("--steps", type=int, default=3, help="LoRA steps before and after the prune step")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 1024, tiny 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calib-samples", type=int, default=None, help="default 16 (tiny 4)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--skip-prune-step", action="store_true", help="only the LoRA steps and the one-block prune")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    if args.tiny:
        device, dtype, shape = torch.device("cpu"), torch.float32, SHAPES["tiny"]
        args.seq = args.seq or 32
        args.calib_samples = args.calib_samples or 4
    else:
        if not torch.cuda.is_available():
            print(json.dumps({"error": "no CUDA device; use --tiny for the CPU smoke test"}))
            return 2
        device, dtype, shape = torch.device("cuda", 0), torch.bfloat16, SHAPES["7b"]
        args.seq = args.seq or 1024
        args.calib_samples = args.calib_samples or 16
        torch.backends.cuda.matmul.allow_tf32 = False  # the statistics/PBS solve in true fp32
    from peft import LoraConfig, get_peft_model

    from xpert_dist.config import PruneConfig
    from xpert_dist.models import structure as st
    from xpert_dist.prune.pruner import Pruner
    from xpert_dist.stats.sequential import sequential_calibration

    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "shape": shape, "seq": args.seq, "batch": args.batch,
           "calib_samples": args.calib_samples, "dtype": str(dtype).replace("torch.", "")}
    t = Timer(device)
    with t:
        model, cfg = build(shape, device, dtype)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LINEARS))
        if args.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    out["build"] = t.record(params=sum(p.numel() for p in model.parameters()),
                            lora_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    train_ids = torch.randint(0, shape["vocab_size"], (max(1, args.steps), args.batch, args.seq), generator=g).to(device)
    calib = torch.randint(0, shape["vocab_size"], (args.calib_samples, args.seq), generator=g).to(device)

    model.train()
    with Timer(device) as t:
        times, losses = lora_steps(model, opt, train_ids, args.steps, device)
    out["train_before"] = t.record(step_seconds=[round(x, 3) for x in times], losses=losses)

    pruner = Pruner(PruneConfig(method="foresight", sparsity=args.sparsity, pbs="diagonal", stats_dtype="float32"),
                    batch_size=args.batch, progress=False)
    if not args.skip_prune_step:
        with Timer(device) as t:
            rep = pruner.step(model, calib, args.sparsity)
        sp = list(rep.sparsity.values())
        out["prune_step"] = t.record(blocks=len(st.blocks(model)), matrices=len(sp),
                                     min_sparsity=min(sp), max_sparsity=max(sp))
        model.train()
        with Timer(device) as t:
            times, losses = lora_steps(model, opt, train_ids, args.steps, device)
        out["train_after"] = t.record(step_seconds=[round(x, 3) for x in times], losses=losses)

    # one block, full Hessians: statistics + ForeSight + PBS full (the 70B solver path)
    full = Pruner(PruneConfig(method="foresight", sparsity=args.sparsity, pbs="full", ema_eta=1.0),
                  batch_size=args.batch, progress=False)

    class _Done(Exception):
        pass

    timing = {}

    def on_block(i, block, stats):
        timing["stats_s"] = time.perf_counter() - timing["t0"]
        t1 = time.perf_counter()
        full.prune_block(model, i, block, stats, args.sparsity, use_pbs=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing["prune_s"] = time.perf_counter() - t1
        raise _Done

    with Timer(device) as t:
        timing["t0"] = time.perf_counter()
        try:
            sequential_calibration(model, calib, on_block, mode="full", dtype=torch.float32, batch_size=args.batch,
                                   progress=False)
        except _Done:
            pass
    from xpert_dist.maths.masks import sparsity_of

    out["full_hessian_block"] = t.record(stats_seconds=round(timing.get("stats_s", float("nan")), 3),
                                         score_mask_pbs_seconds=round(timing.get("prune_s", float("nan")), 3),
                                         matrices=len(full.masks),
                                         sparsity=sorted(set(round(sparsity_of(k), 4) for k in full.masks.values())))
    out["planner"] = planner_prediction(shape, args)
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "gpu_check.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
