"""Harness cells: 70B-family blocks under DeepSpeed ZeRO-3 (2 gloo ranks) through ``Pruner``, with
per-part timers and per-phase peak RSS."""
from __future__ import annotations

import json
import time

from bench.planner_validation import hwm_bytes, reset_peak, rss_bytes, spawn_ranks
from bench.rehearsal_70b.common import CACHE, LINEARS, MALLOC_ENV, VOCAB, _atomic_json, llama_config

def cell_key(cell: dict) -> str:
    return (f"rh70-{cell['kind']}-{cell['shape']}-L{cell['layers']}-w{cell['world']}-s{cell['seq_len']}-"
            f"c{cell['calib_samples']}-st{cell['steps']}")



class PartTimer:
    """Wall seconds of named parts of a prune step, by wrapping the functions that do them."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, attr: str, part: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t0
                self.cpu[part] = self.cpu.get(part, 0.0) + time.process_time() - c0
                self.calls[part] = self.calls.get(part, 0) + 1

        setattr(owner, attr, timed)

    def take(self) -> dict:
        out = {"seconds": dict(self.seconds), "cpu_seconds": dict(self.cpu), "calls": dict(self.calls)}
        self.seconds.clear()
        self.cpu.clear()
        self.calls.clear()
        return out


def install_timers(ctx) -> PartTimer:
    """Time the parts of ``Pruner.step``: the on-block callback (everything but the calibration
    forwards and statistics hooks), the reduction, scores, mask, PBS, SparseGPT, weight writes."""
    from xpert_dist.maths import sparsegpt as sg_mod
    from xpert_dist.models import structure
    from xpert_dist.prune import block as block_mod, pruner as pruner_mod

    tm = PartTimer()
    tm.wrap(pruner_mod.Pruner, "prune_block", "on_block (gather, scores, solve, writes)")
    tm.wrap(ctx, "reduce_stats", "reduce statistics")
    tm.wrap(pruner_mod, "block_scores", "scores")
    tm.wrap(block_mod, "choose_mask", "mask")
    tm.wrap(block_mod, "adapter_update", "PBS solve")
    tm.wrap(sg_mod, "sparsegpt_prune", "SparseGPT solve")
    tm.wrap(ctx, "compute_owned", "compute_owned (owned solves + broadcast)")
    tm.wrap(structure, "set_base_weight", "writes (base weights)")
    tm.wrap(ctx, "write_trainable", "writes (LoRA B)")
    return tm


def rank_cell(rank, world, cell):
    """One rank of a harness cell: baseline, training-step peak, two ForeSight+PBS prune steps, one
    SparseGPT step; peak RSS (VmHWM after a reset) and per-part times of each."""
    import torch

    torch.set_num_threads(1)
    from xpert_dist.distributed.comm import skip_shm_op_build

    skip_shm_op_build()
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.planner_validation import ds_engine
    from xpert_dist.config import PruneConfig
    from xpert_dist.distributed.context import TorchDistContext
    from xpert_dist.prune.pruner import Pruner

    ctx = TorchDistContext(timeout_s=3600)
    reset_peak()
    baseline = rss_bytes()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_config(cell["shape"], cell["layers"])))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LINEARS))
    engine = ds_engine(model, world, cell["micro_batch"])
    model = engine.module
    after_init = rss_bytes()
    g = torch.Generator().manual_seed(1)
    S, mb = cell["seq_len"], cell["micro_batch"]
    train_ids = torch.randint(0, VOCAB, (cell["steps"] * world, mb, S), generator=g)
    calib = torch.randint(0, VOCAB, (cell["calib_samples"], S), generator=g)
    out = {"baseline": baseline, "after_init": after_init, "phases": {}}

    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cell["steps"]):
        x = train_ids[step * world + rank]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    out["phases"]["train"] = {"peak": hwm_bytes(), "seconds_per_step": (time.perf_counter() - t0) / cell["steps"],
                              "cpu_seconds_per_step": (time.process_time() - c0) / cell["steps"],
                              "loss": float(loss)}
    tm = install_timers(ctx)
    runs = {"foresight_pbs_full_1": dict(method="foresight", pbs="full"),
            "foresight_pbs_full_2": dict(method="foresight", pbs="full"),
            "sparsegpt": dict(method="sparsegpt", pbs="off")}
    pruner = None
    for name in cell["prune_runs"]:
        kw = runs[name]
        if pruner is None or pruner.cfg.method != kw["method"]:
            pruner = Pruner(PruneConfig(sparsity=0.5, solver_dtype="float32", **kw), ctx,
                            batch_size=cell["calib_batch"], progress=False)
        ctx.barrier()
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        rep = pruner.step(model, calib, 0.5)
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        out["phases"][name] = {"peak": hwm_bytes(), "seconds": sec, "cpu_seconds": cpu, "parts": tm.take(),
                               "sparsity": rep.sparsity}
    ctx.barrier()
    return out


ALL_RUNS = ["foresight_pbs_full_1", "foresight_pbs_full_2", "sparsegpt"]


def harness(shape: str, layers: int = 1, seq_len: int = 64, calib_samples: int = 4, steps: int = 2,
            prune_runs=None, fresh: bool = False) -> dict:
    cell = dict(kind="harness", shape=shape, layers=layers, world=2, seq_len=seq_len, micro_batch=1,
                calib_samples=calib_samples, calib_batch=1, steps=steps)
    if prune_runs and list(prune_runs) != ALL_RUNS:
        cell["prune_runs"] = list(prune_runs)
    key = cell_key(cell) + ("-" + "+".join(r[:3] + r[-1] for r in cell["prune_runs"]) if "prune_runs" in cell else "")
    cell.setdefault("prune_runs", ALL_RUNS)
    path = CACHE / f"{key}.json"
    if path.is_file() and not fresh:
        print(f"[cached] {key}", flush=True)
        return json.loads(path.read_text())
    t0 = time.time()
    ranks = spawn_ranks(rank_cell, cell["world"], cell, timeout=6 * 3600, env=MALLOC_ENV)
    rec = {"cell": cell, "ranks": ranks, "wall_s": time.time() - t0}
    _atomic_json(path, rec)
    print(f"[done {rec['wall_s']:.0f}s] {key}", flush=True)
    return rec
