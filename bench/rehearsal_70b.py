"""70B dress rehearsal on CPU: Llama-2-70B-shaped matrices and blocks through the real code.

Three kinds of cells (each cached in bench/results/cache/, resumed on a rerun):

* ``micro``: single matrices at the exact 70B widths (``down_proj`` 8192 x 28672, ``q_proj``
  8192 x 8192, ``gate_proj`` 28672 x 8192) with a random SPD ``H = XᵀX`` (X: random correlated
  calibration tokens): time and peak RSS of each part of a prune step for that matrix (statistics,
  scores, mask, PBS full/diagonal, SparseGPT), with their FLOP counts; the previous
  ``pbs_full`` dense formula is timed on a row slice and scaled by rows (it is linear in them).
  One part per subprocess, so each peak RSS is that part's own.
* ``harness``: a random Llama with 70B-family block shapes (named in the cell) wrapped with LoRA
  r 8 on all seven linears, DeepSpeed ZeRO-3 over 2 gloo ranks (``ds_configs/zero3.json``), a
  few training steps, two in-loop prune steps with ForeSight + full-Hessian PBS (the second is the
  steady state the planner describes) and one SparseGPT prune step, through
  ``xpert_dist.prune.pruner.Pruner`` with timers wrapped around its parts; peak RSS per phase
  per rank (VmHWM after a reset), compared with ``python -m xpert_dist.plan`` for the same shapes.
* ``pipeline``: the real entry point, ``torchrun --nproc_per_node 2 launchers/run.py --ds_config
  ds_configs/zero3.json`` with ``model.tiny`` set to the cell's shape (tiny = random weights
  built in-process; it skips HfDeepSpeedConfig's zero.Init, every rank builds the model once):
  training steps, in-loop prune steps, the final prune, export and the reload of the export.

    python bench/rehearsal_70b.py micro            # single full-width matrices
    python bench/rehearsal_70b.py harness --shape 70b-quarter
    python bench/rehearsal_70b.py pipeline --shape 70b-quarter
    python bench/rehearsal_70b.py report           # bench/results/rehearsal_70b.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.planner_validation import hwm_bytes, reset_peak, rss_bytes, spawn_ranks  # noqa: E402

RESULTS = REPO / "bench" / "results"
CACHE = RESULTS / "cache"
MiB, GiB = 1024 ** 2, 1024 ** 3
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
L70 = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
# block shapes of the cells: the exact 70B one and the same family at 1/2, 1/4 and 1/8 width (head_dim 128,
# MLP/hidden = 3.5, 8 query heads per KV head, as in Llama-2-70B)
SHAPES = {
    "70b": dict(L70),
    "70b-half": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=4),
    "70b-quarter": dict(hidden_size=2048, intermediate_size=7168, num_attention_heads=16, num_key_value_heads=2),
    "70b-eighth": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=1),
}
VOCAB = 512
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors go back to the OS: RSS = live memory


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ============================================================================ micro: one matrix
MATRICES = {"down_proj": (8192, 28672), "q_proj": (8192, 8192), "gate_proj": (28672, 8192)}
PARTS = ("statistics", "scores", "mask", "pbs_full", "pbs_full_old", "pbs_diagonal", "sparsegpt")


def micro_flops(part: str, out_f: int, in_f: int, r: int, n_tok: int) -> float:
    """Multiply-adds x 2 of each part (the dominant terms)."""
    return {"statistics": 2.0 * n_tok * in_f * in_f,  # XᵀX
            "scores": 4.0 * out_f * in_f,  # elementwise (memory-bound)
            "mask": 0.0,  # a sort: not FLOPs (see seconds)
            "pbs_full": 2.0 * r * in_f * in_f + 4.0 * out_f * in_f * r,  # A·H, (U⊙P)·(AH)ᵀ
            "pbs_full_old": 2.0 * out_f * in_f * in_f + 2.0 * out_f * in_f * r,  # (U⊙P)·H
            "pbs_diagonal": 4.0 * out_f * in_f * r,
            # potrf (n³/3) + potri (2n³/3) + potrf (n³/3), then the OBS updates (out·in² over blocks)
            "sparsegpt": 4.0 / 3.0 * in_f ** 3 + 1.0 * out_f * in_f * in_f}[part]


def _micro_inputs(out_f: int, in_f: int, r: int, n_tok: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # correlated calibration inputs: random tokens times a low-rank mixing plus per-feature scales
    base = torch.randn(n_tok, in_f, generator=g)
    mix = torch.randn(n_tok, 64, generator=g) @ torch.randn(64, in_f, generator=g) / 8.0
    X = (base + mix) * torch.exp(0.5 * torch.randn(in_f, generator=g))
    W = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    A = torch.randn(r, in_f, generator=g) / in_f ** 0.5
    return X, W, A


def micro_rows(part: str, out_f: int, rows: int | None) -> int:
    """Rows of W built and timed: all, or a slice (the previous PBS formula: 256) when memory is short;
    the time is then scaled by ``out_f / rows`` (exact for the parts linear in rows, an upper bound for
    ``pbs_full``, whose ``A·H`` does not depend on them)."""
    return min(out_f, rows or (256 if part == "pbs_full_old" else out_f))


def micro_part(matrix: str, part: str, n_tok: int = 512, r: int = 8, rows: int | None = None) -> dict:
    """Time one part for one matrix in this process (run in a fresh subprocess by ``micro``)."""
    import torch

    from xpert_dist.maths import masks, pbs, scores, sparsegpt
    from xpert_dist.stats.capture import accumulate

    torch.set_num_threads(int(os.environ.get("REHEARSAL_THREADS", "1")))
    out_f, in_f = MATRICES[matrix]
    rows = micro_rows(part, out_f, rows)
    X, W, A = _micro_inputs(rows, in_f, r, n_tok)
    t0, c0 = time.perf_counter(), time.process_time()
    H = accumulate(X, "full", torch.float32, None)  # the statistic as the pipeline accumulates it
    stat_s, stat_cpu = time.perf_counter() - t0, time.process_time() - c0
    del X
    d = H.diagonal().clone()
    keep = None
    if part.startswith("pbs"):  # a 50% per-row magnitude mask (cheap to build; the solves' cost does not depend on it)
        aw = W.abs()
        keep = aw >= aw.median(dim=1, keepdim=True).values
        del aw
    reset_peak()
    rss0 = rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    if part == "statistics":
        sec, cpu = stat_s, stat_cpu
    elif part == "scores":
        s = scores.wanda_scores(W, d)
    elif part == "mask":
        s = scores.wanda_scores(W, d)
        t0, c0 = time.perf_counter(), time.process_time()
        k = masks.select_mask(s, 0.5, "output")
    elif part == "pbs_full":
        dB = pbs.pbs_full(W, A, keep, H, 2.0, support="dense")
    elif part == "pbs_full_old":  # the previous formula on a row slice (cost is linear in rows)
        Ws, ks = W, keep
        Hu = (Ws * (~ks).float()) @ H
        G = 4.0 * (A @ H @ A.t()) + 1e-8 * torch.eye(r)
        dB = torch.linalg.solve(G, (2.0 * (Hu @ A.t())).t()).t()
    elif part == "pbs_diagonal":
        dB = pbs.pbs_diagonal(W, A, keep, d, 2.0)
    elif part == "sparsegpt":
        Wn, k = sparsegpt.sparsegpt_prune(W, H, 0.5, blocksize=128, percdamp=0.01, dtype=torch.float32)
    else:
        raise ValueError(part)
    if part != "statistics":
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    scaled = cpu * out_f / rows  # CPU time of the one thread: far less sensitive to the shared machine's load
    return {"matrix": matrix, "shape": [out_f, in_f], "part": part, "n_tokens": n_tok, "r": r,
            "wall_seconds": sec, "cpu_seconds": cpu, "rows_timed": rows, "cpu_seconds_full_rows": scaled,
            "flops": micro_flops(part, out_f, in_f, r, n_tok),
            "gflops_per_s": micro_flops(part, out_f, in_f, r, n_tok) / scaled / 1e9 if scaled > 0 else None,
            "peak_rss_bytes": hwm_bytes(), "rss_before_part_bytes": rss0,
            "part_extra_peak_bytes": hwm_bytes() - rss0, "threads": torch.get_num_threads()}


def micro_peak_bytes(part: str, out_f: int, in_f: int) -> float:
    """Rough peak of one micro part (H, W and the part's largest temporaries), to decide whether it may run."""
    base = 4.0 * (in_f * in_f + out_f * in_f)
    extra = {"sparsegpt": 4.0 * (2 * in_f * in_f + 2 * out_f * in_f), "mask": 4.0 * 4 * out_f * in_f,
             "pbs_full": 4.0 * 2 * out_f * in_f, "pbs_diagonal": 4.0 * 2 * out_f * in_f}.get(part, 4.0 * out_f * in_f)
    return base + extra + 0.5 * GiB


def mem_available() -> int:
    import re

    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024


def micro(matrices, parts, fresh=False, rows: int | None = None) -> list[dict]:
    out = []
    for mname in matrices:
        for part in parts:
            o_f, i_f = MATRICES[mname]
            n_rows = micro_rows(part, o_f, rows)
            key = f"rh70-micro-{mname}-{part}" + (f"-rows{n_rows}" if rows and n_rows != o_f and part != "pbs_full_old" else "")
            path = CACHE / f"{key}.json"
            if path.is_file() and not fresh:
                out.append(json.loads(path.read_text()))
                print(f"[cached] {key}", flush=True)
                continue
            need = micro_peak_bytes(part, n_rows, i_f) + 3 * GiB  # 3 GiB headroom: the machine is shared
            if mem_available() < need:
                print(f"[skipped: memory] {key}: needs ~{need / GiB:.1f} GiB incl. 3 GiB headroom, "
                      f"{mem_available() / GiB:.1f} GiB available", flush=True)
                continue
            env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            t0 = time.time()
            p = subprocess.run([sys.executable, __file__, "_micro_part", mname, part, str(n_rows)], env=env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                print(f"[failed] {key}: {p.stderr[-2000:]}", flush=True)
                continue
            rec = json.loads(p.stdout.strip().splitlines()[-1])
            rec["wall_s"] = time.time() - t0
            _atomic_json(path, rec)
            print(f"[done] {key}: {rec['cpu_seconds_full_rows']:.2f} CPU s, peak {rec['peak_rss_bytes'] / GiB:.2f} GiB",
                  flush=True)
            out.append(rec)
    return out


# ============================================================================ harness: blocks under ZeRO-3
def cell_key(cell: dict) -> str:
    return (f"rh70-{cell['kind']}-{cell['shape']}-L{cell['layers']}-w{cell['world']}-s{cell['seq_len']}-"
            f"c{cell['calib_samples']}-st{cell['steps']}")


def llama_config(shape: str, layers: int) -> dict:
    return dict(SHAPES[shape], vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False)


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


# ============================================================================ pipeline: the real entry point
def pipeline(shape: str, layers: int = 1, method: str = "foresight", pbs: str = "full", fresh: bool = False) -> dict:
    """``torchrun --nproc_per_node 2 launchers/run.py --ds_config ds_configs/zero3.json`` on a random
    Llama of the cell's shape (``model.tiny``): 3 optimizer steps, an in-loop prune step before step 2,
    the final prune, export, reload of the export and a 2-window perplexity."""
    import random

    key = f"rh70-pipeline-{shape}-L{layers}-{method}-{pbs}"
    path = CACHE / f"{key}.json"
    if path.is_file() and not fresh:
        print(f"[cached] {key}", flush=True)
        return json.loads(path.read_text())
    out_dir = CACHE / f"{key}-run"
    cfg = {"name": key, "output_dir": str(out_dir),
           "model": {"tiny": llama_config(shape, layers)},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
           "data": {"train": "health", "seq_len": 64, "max_train_samples": 16, "calib_samples": 4},
           "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-4, "warmup_steps": 1, "log_every": 1},
           "prune": {"method": method, "sparsity": 0.5, "pbs": pbs, "schedule": "steps", "prune_every": 2,
                     "solver_dtype": "float32"},
           "eval": {"perplexity_windows": 2, "perplexity_seq_len": 64, "tasks": []}}
    cfg_path = CACHE / f"{key}.config.json"
    _atomic_json(cfg_path, cfg)
    port = random.randint(29600, 29999)
    cmd = [str(REPO / ".venv" / "bin" / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "launchers" / "run.py"), "--ds_config", str(REPO / "ds_configs" / "zero3.json"),
           "--config", str(cfg_path), "--no-progress"]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    rec = {"key": key, "shape": shape, "layers": layers, "method": method, "pbs": pbs, "command": cmd,
           "rc": proc.returncode, "wall_s": wall, "log_tail": (proc.stdout + proc.stderr)[-4000:]}
    res = out_dir / "results.json"
    if proc.returncode == 0 and res.is_file():
        r = json.loads(res.read_text())
        rec.update(timing=r.get("timing"), memory=r.get("memory"), prune_reports=r.get("prune_reports"),
                   sparsity=r.get("sparsity"), metrics=r.get("metrics"), loss_history=r.get("loss_history"),
                   exported=sorted(x.name for x in (out_dir / "model").iterdir()))
    _atomic_json(path, rec)
    print(f"[done rc={proc.returncode} {wall:.0f}s] {key}", flush=True)
    return rec


# ============================================================================ planner predictions
def plan_spec(cell: dict, method: str, pbs: str, model_layers: int | None = None, **over):
    from xpert_dist.plan.memory import PlanSpec
    from xpert_dist.plan.shapes import ModelShape

    cfg = llama_config(cell["shape"], model_layers or cell["layers"])
    shape = ModelShape.from_config(cfg, name=f"{cell['shape']}-{cfg['num_hidden_layers']}L")
    kw = dict(model=shape, nodes=1, gpus_per_node=cell["world"], zero_stage=3, accelerator="cpu",
              dtype="float32", method=method, pbs=pbs, lora_r=8, lora_dropout=0.05, seq_len=cell["seq_len"],
              micro_batch=cell["micro_batch"], calib_samples=cell["calib_samples"],
              calib_batch=cell["calib_batch"], prefetch_bucket_params=50_000_000)
    kw.update(over)
    return PlanSpec(**kw)


def predict(cell: dict) -> dict:
    from xpert_dist.plan.memory import estimate

    fs = estimate(plan_spec(cell, "foresight", "full"))
    # the first prune step starts without EMA scores but creates them block by block: at its last block
    # (where the peak is) the owned ones all exist, so it is predicted with the same terms as the steady state
    fs1 = estimate(plan_spec(cell, "foresight", "full"))
    sg = estimate(plan_spec(cell, "sparsegpt", "off"))
    stats_bytes = sum(t.bytes for t in fs.terms if t.name.startswith("reduced statistics held"))
    # the harness trains before any prune step: dense LoRA, without the masked adapter's terms (the planner adds
    # those for training after the mask is final); CPU case: every term is host, peak = resident + compute
    dense = sum(t.bytes for t in fs.terms if t.step == "train" and t.where == "host"
                and not t.name.startswith("masked")) * fs.spec.constants.cpu_allocator_slack
    return {"train": dense, "train_with_masked_adapter": fs.peaks["train"]["host"],
            "foresight_pbs_full": fs.peaks["prune"]["host"],
            "foresight_pbs_full_first": fs1.peaks["prune"]["host"],
            "sparsegpt": sg.peaks["prune"]["host"], "reduced_statistics_bytes": stats_bytes,
            "terms_foresight": [t.to_dict() for t in fs.terms if t.step == "prune"],
            "terms_sparsegpt": [t.to_dict() for t in sg.terms if t.step == "prune"]}


def statistics_bytes(cell: dict) -> int:
    """Size of one block's full XᵀX statistics (all four input groups, fp32), from the shapes."""
    c = SHAPES[cell["shape"]]
    h, i = c["hidden_size"], c["intermediate_size"]
    q = c["num_attention_heads"] * (h // c["num_attention_heads"])
    return 4 * (h * h + q * q + h * h + i * i)


def compare(rec: dict) -> dict:
    cell = rec["cell"]
    pred = predict(cell)
    rows = []
    runs = cell.get("prune_runs", ALL_RUNS)
    pairs = [("train", "train"), ("foresight_pbs_full_1", "foresight_pbs_full_first"),
             ("foresight_pbs_full_2", "foresight_pbs_full"), ("sparsegpt", "sparsegpt")]
    for phase, key in pairs:
        if phase != "train" and phase not in runs:
            continue
        meas = max(r["phases"][phase]["peak"] for r in rec["ranks"])
        rows.append({"phase": phase, "measured_bytes": meas, "predicted_bytes": pred[key],
                     "err_pct": 100.0 * (pred[key] - meas) / meas})
    return {"rows": rows, "prediction": pred, "statistics_bytes": statistics_bytes(cell)}


# ============================================================================ extrapolation to the 80-block model
# GPU constants: ASSUMPTIONS (no GPU measured them here); named so the arithmetic can be redone.
GPU = {"name": "H100-SXM-80GB (README's 8 nodes x 8 GPUs plan)",
       "bf16_tflops_effective": 400.0,  # 989 peak dense bf16 x ~40% MFU (training and calibration forwards)
       "fp32_tflops_effective": 50.0,  # 67 peak fp32 without TF32 (torch's default "highest" precision) x 75%
       "hbm_gb_s_effective": 2000.0,  # 3.35 TB/s peak x 60% (elementwise scores, masks, writes)
       "bytes_per_weight_elementwise": 64.0,  # ForeSight scores + EMA + mask sort + writes, per weight
       "internode_gb_s_per_gpu": 50.0,  # 400 Gb/s NIC per GPU
       "intranode_gb_s": 450.0}  # NVLink


def extrapolate(cfg_path: Path = REPO / "configs" / "llama70b_health.yaml", world: int = 64,
                gpus_per_node: int = 8, global_batch: int | None = None, n_train_tokens: int | None = None) -> dict:
    """One prune step of Llama-2-70B (80 blocks) and the whole training run of ``cfg_path`` on
    ``world`` GPUs, as FLOP/byte counts divided by the assumed throughputs in ``GPU``."""
    import yaml

    from xpert_dist.plan.shapes import ModelShape
    from xpert_dist.train.schedule import plan_prune_steps
    from xpert_dist.config import PruneConfig

    y = yaml.safe_load(cfg_path.read_text())
    m = ModelShape.load("llama2_70b")
    S = int(y["data"]["seq_len"])
    n_cal = int(y["data"]["calib_samples"])
    T = n_cal * S
    r = int(y["lora"]["r"])
    shapes = m.linear_shapes()
    P_blk = m.block_linear_params()
    P_lin = m.layers * P_blk + m.vocab * m.hidden  # matmul parameters (blocks + LM head)
    bf, f32 = GPU["bf16_tflops_effective"] * 1e12, GPU["fp32_tflops_effective"] * 1e12
    attn_fwd_tok = 4.0 * S * m.q_dim  # QKᵀ and AV per token per layer (no causal saving)
    # ---- prune step, per block (calibration split over all ranks; solves on module owners)
    fwd = 2 * T * (2.0 * P_blk + attn_fwd_tok)  # two forwards per block (statistics, then recompute)
    dims = m.group_dims()
    stats_full = 2.0 * T * sum(d * d for d in dims.values())
    stats_diag = 2.0 * T * sum(dims.values())
    pbs_new = {n: 2.0 * r * i * i + 4.0 * o * i * r for n, (o, i) in shapes.items()}
    pbs_old = {n: 2.0 * o * i * i + 2.0 * o * i * r for n, (o, i) in shapes.items()}
    sgpt = {n: 4.0 / 3.0 * i ** 3 + 1.0 * o * i * i for n, (o, i) in shapes.items()}
    n_inter = world - gpus_per_node
    n_intra = gpus_per_node - 1
    big = max(dims.values()) ** 2 * 4  # the owner of down_in receives every rank's partial
    reduce_s = big * (n_inter / (GPU["internode_gb_s_per_gpu"] * 1e9) + n_intra / (GPU["intranode_gb_s"] * 1e9))
    elementwise_s = P_blk * GPU["bytes_per_weight_elementwise"] / (GPU["hbm_gb_s_effective"] * 1e9)
    blk = {"calibration forwards (bf16, /W)": fwd / world / bf,
           "statistics XᵀX full (fp32, /W)": stats_full / world / f32,
           "statistics diag (fp32, /W)": stats_diag / world / f32,
           "reduction of full XᵀX to owners (down_in, (W-1) partials)": reduce_s,
           "scores + mask + writes (elementwise, largest owner: all)": elementwise_s,
           "PBS full dense solve, A·H first (down_proj owner)": pbs_new["down_proj"] / f32,
           "PBS full dense solve, previous (U⊙P)·H (down_proj owner)": pbs_old["down_proj"] / f32,
           "SparseGPT solve (down_proj owner)": sgpt["down_proj"] / f32}
    step_full = m.layers * (blk["calibration forwards (bf16, /W)"] + blk["statistics XᵀX full (fp32, /W)"]
                            + blk["reduction of full XᵀX to owners (down_in, (W-1) partials)"]
                            + blk["scores + mask + writes (elementwise, largest owner: all)"]
                            + blk["PBS full dense solve, A·H first (down_proj owner)"])
    step_diag = m.layers * (blk["calibration forwards (bf16, /W)"] + blk["statistics diag (fp32, /W)"]
                            + blk["scores + mask + writes (elementwise, largest owner: all)"])
    # ---- training
    tok = n_train_tokens
    B = global_batch or max(world, int(y["train"].get("batch_size", 1)))
    rows = tok // S
    spe = max(1, rows // B)
    epochs = int(y["train"].get("epochs", 1))
    total = spe * epochs
    flops_tok = 3.0 * (2.0 * P_lin + attn_fwd_tok * m.layers)  # forward + recompute + input-grad backward
    step_tokens = B * S
    train_step_s = step_tokens * flops_tok / world / bf
    pc = PruneConfig(**{k: v for k, v in y["prune"].items() if k in PruneConfig.__dataclass_fields__})
    plan = plan_prune_steps(pc, spe, total)
    n_inloop = len(plan.steps)
    train_s = total * train_step_s
    out = {"gpu_assumptions": GPU, "world": world, "calibration_tokens": T, "seq_len": S,
           "per_block_seconds": blk,
           "per_block_flops": {"calibration forwards": fwd, "statistics full": stats_full, "statistics diag": stats_diag,
                               "PBS full dense new (down_proj)": pbs_new["down_proj"],
                               "PBS full dense previous (down_proj)": pbs_old["down_proj"],
                               "SparseGPT (down_proj)": sgpt["down_proj"],
                               "PBS full new (all 7)": sum(pbs_new.values()), "PBS full previous (all 7)": sum(pbs_old.values())},
           "prune_step_s": {"pbs full (statistics full)": step_full, "pbs diagonal / final step (statistics diag)": step_diag},
           "training": {"train_tokens": tok, "rows": rows, "global_batch": B, "steps_per_epoch": spe, "epochs": epochs,
                        "total_steps": total, "flops_per_token": flops_tok, "step_s": train_step_s, "train_s": train_s,
                        "inloop_prune_steps": list(plan.steps), "final_prune_step": True,
                        "config_batch_size": y["train"].get("batch_size")}}
    ratios = {}
    for name, inloop in (("pbs diagonal (shipped in configs/llama70b_health.yaml)", step_diag),
                         ("pbs full", step_full)):
        ex = train_s + n_inloop * inloop + step_diag  # + the final prune (no PBS: diagonal statistics)
        ratios[name] = {"vs_plain_lora": ex / train_s, "vs_lora_then_prune": ex / (train_s + step_diag)}
    out["time_ratio"] = ratios
    # how many training tokens make the shipped schedule (1 in-loop + final) stay within 1.10x of plain LoRA
    per_tok = flops_tok / world / bf
    for name, inloop in (("pbs diagonal", step_diag), ("pbs full", step_full)):
        out.setdefault("tokens_for_1.10x", {})[name] = (n_inloop * inloop + step_diag) / (0.10 * per_tok * epochs)
    return out


# ============================================================================ report
def _load(pattern: str) -> list[dict]:
    return [json.loads(x.read_text()) for x in sorted(CACHE.glob(pattern)) if not x.name.endswith(".config.json")]


def report() -> dict:
    micro_recs = _load("rh70-micro-*.json")
    harness_recs = _load("rh70-harness-*.json")
    pipe_recs = _load("rh70-pipeline-*.json")
    cells = []
    for rec in harness_recs:
        cmp_ = compare(rec)
        parts = {}
        for ph in rec["cell"].get("prune_runs", ALL_RUNS):
            r0 = rec["ranks"]
            parts[ph] = {"seconds_max_rank": max(r["phases"][ph]["seconds"] for r in r0),
                         "cpu_seconds_max_rank": max((r["phases"][ph].get("cpu_seconds") or 0.0) for r in r0) or None,
                         "parts_cpu_seconds_by_rank": [r["phases"][ph]["parts"].get("cpu_seconds") for r in r0],
                         "parts_seconds_by_rank": [r["phases"][ph]["parts"]["seconds"] for r in r0],
                         "step_cpu_by_rank": [r["phases"][ph].get("cpu_seconds") for r in r0],
                         "step_wall_by_rank": [r["phases"][ph]["seconds"] for r in r0]}
        cells.append({"cell": rec["cell"], "wall_s": rec["wall_s"], "comparison": cmp_["rows"],
                      "statistics_bytes_one_block": cmp_["statistics_bytes"],
                      "predicted_reduced_statistics_bytes": cmp_["prediction"]["reduced_statistics_bytes"],
                      "train": {k: max(r["phases"]["train"].get(k) or 0 for r in rec["ranks"])
                                for k in ("seconds_per_step", "cpu_seconds_per_step")},
                      "prune": parts, "baseline_bytes": max(r["baseline"] for r in rec["ranks"])})
    pipes = [{k: v for k, v in r.items() if k not in ("log_tail", "command", "loss_history")} for r in pipe_recs]
    for p_ in pipes:  # the run's peak (rank 0's high-water mark over all phases) against the planner's max of steps
        if p_.get("rc") != 0 or not p_.get("memory"):
            continue
        c = dict(kind="pipeline", shape=p_["shape"], layers=p_["layers"], world=2, seq_len=64, micro_batch=1,
                 calib_samples=4, calib_batch=2, steps=3)  # calibration forwards use train.batch_size rows
        pr = predict(c)
        prune_key = "sparsegpt" if p_["method"] == "sparsegpt" else "foresight_pbs_full"
        # training after the in-loop prune step runs with the masked adapter (prune.mask_final=last_inloop)
        pred = max(pr["train_with_masked_adapter"], pr[prune_key])
        meas = p_["memory"]["peak_rss_mb"] * MiB
        p_["planner_peak_bytes"] = pred
        p_["planner_err_pct"] = 100.0 * (pred - meas) / meas
    from xpert_dist.data import sources  # noqa: F401  (token count below is recorded, not recomputed)
    ext = extrapolate(n_train_tokens=HEALTH_TOKENS)
    not_run = {}
    for sh in ("70b-half", "70b"):
        c = dict(kind="harness", shape=sh, layers=1, world=2, seq_len=64, micro_batch=1, calib_samples=4,
                 calib_batch=1, steps=2)
        pr = predict(c)
        not_run[sh] = {k: pr[k] for k in ("train", "foresight_pbs_full", "sparsegpt", "reduced_statistics_bytes")}
    res = {"micro": micro_recs, "harness": cells, "pipeline": pipes, "extrapolation": ext, "not_run": not_run,
           "health_train_tokens_note": "health training set: 2137 records, 637,556 SmolLM2 tokens (Llama-2's "
                                       "tokenizer is not available offline; taken as the token count)"}
    errs = [abs(r["err_pct"]) for c in cells for r in c["comparison"]]
    res["summary"] = {"max_abs_err_pct": max(errs) if errs else None, "n_predictions": len(errs),
                      "within_15pct": sum(e <= 15 for e in errs)}
    return res


HEALTH_TOKENS = 637556  # measured once with the SmolLM2 tokenizer (see report note)


def _fmt_s(x):
    return "–" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def write(res: dict) -> None:
    _atomic_json(RESULTS / "rehearsal_70b.json", res)
    L = ["# 70B dress rehearsal on CPU (bench/rehearsal_70b.py)", "",
         "Shared 2-core CPU machine (load average 15-20 from other work during these runs): wall times are "
         "inflated ~5-10x; CPU seconds (process time of one thread) are the comparable numbers.", ""]
    L += ["## Single matrices at the exact 70B widths (random SPD H = XᵀX of 512 correlated tokens, r = 8, 50%)", "",
          "| matrix | part | CPU s (full rows) | FLOPs | CPU GFLOP/s | peak RSS GiB | note |", "|---|---|---|---|---|---|---|"]
    for m in sorted(res["micro"], key=lambda x: (x["matrix"], PARTS.index(x["part"]))):
        note = f"timed on {m['rows_timed']} rows, scaled" if m["rows_timed"] != m["shape"][0] else ""
        gf = m.get("gflops_per_s")
        L.append(f"| {m['matrix']} {m['shape'][0]}x{m['shape'][1]} | {m['part']} | {_fmt_s(m['cpu_seconds_full_rows'])} | "
                 f"{m['flops']:.3g} | {'–' if not gf else f'{gf:.2f}'} | {m['peak_rss_bytes'] / GiB:.2f} | {note} |")
    L += ["", "Row slices: the time is scaled by out/rows (exact for parts linear in rows; an upper bound for "
          "pbs_full, whose A·H term does not grow with rows). pbs_full_old is the formula before commit bb03721, "
          "(U⊙P)·H. The pbs_full rows were measured after commit 525bf30 (check_finite from the sum, tiled "
          "symmetry check).", ""]
    L += ["", "## Blocks under DeepSpeed ZeRO-3 (2 gloo ranks): measured peak RSS vs `xpert_dist.plan`", "",
          "| shape (h / I / heads q:kv) | layers | phase | measured MiB (max rank) | predicted MiB | error % |",
          "|---|---|---|---|---|---|"]
    for c in res["harness"]:
        sh = SHAPES[c["cell"]["shape"]]
        desc = (f"{c['cell']['shape']} ({sh['hidden_size']} / {sh['intermediate_size']} / "
                f"{sh['num_attention_heads']}:{sh['num_key_value_heads']})")
        for r in c["comparison"]:
            L.append(f"| {desc} | {c['cell']['layers']} | {r['phase']} | {r['measured_bytes'] / MiB:.0f} | "
                     f"{r['predicted_bytes'] / MiB:.0f} | {r['err_pct']:+.1f} |")
    L += ["", "Per-part time of the prune steps (rank 0 / rank 1, CPU s where recorded, else wall s; these cells ran "
          "before commit 525bf30, so their PBS solve times include the entrywise finiteness and strided symmetry "
          "checks that commit made cheaper):", ""]
    for c in res["harness"]:
        for ph, d in c["prune"].items():
            by = d["parts_cpu_seconds_by_rank"] if d["parts_cpu_seconds_by_rank"][0] else d["parts_seconds_by_rank"]
            unit = "CPU s" if d["parts_cpu_seconds_by_rank"][0] else "wall s"
            step_by = [r for r in (d.get("step_cpu_by_rank") if by is d["parts_cpu_seconds_by_rank"] else
                                   d.get("step_wall_by_rank")) or []]
            by = [dict(b, **({"calibration forwards + statistics (step - on_block)":
                              st - b.get("on_block (gather, scores, solve, writes)", 0.0)} if st else {}))
                  for b, st in zip(by, step_by or [None] * len(by))]
            keys = sorted(set().union(*[set(b) for b in by]))
            L.append(f"- {c['cell']['shape']} L{c['cell']['layers']} {ph} ({unit}; step "
                     f"{_fmt_s(d['cpu_seconds_max_rank'] or d['seconds_max_rank'])}): "
                     + "; ".join(f"{k} {' / '.join(_fmt_s(b.get(k, 0.0)) for b in by)}" for k in keys))
    L += ["", "## The real entry point (torchrun, 2 ranks, `launchers/run.py --ds_config ds_configs/zero3.json`)", "",
          "| run | rc | wall s | train s (CPU s) | prune s (CPU s) | peak RSS MiB (rank 0) | planner MiB (error) | export | perplexity |",
          "|---|---|---|---|---|---|---|---|---|"]
    for p_ in res["pipeline"]:
        t = p_.get("timing") or {}
        mem = (p_.get("memory") or {}).get("peak_rss_mb")
        L.append(f"| {p_['key']} | {p_['rc']} | {p_['wall_s']:.0f} | {_fmt_s(t.get('train_s'))} ({_fmt_s(t.get('train_cpu_s'))}) | "
                 f"{_fmt_s(t.get('prune_s'))} ({_fmt_s(t.get('prune_cpu_s'))}) | {_fmt_s(mem)} | "
                 + (f"{p_['planner_peak_bytes'] / MiB:.0f} ({p_['planner_err_pct']:+.1f}%) | " if "planner_peak_bytes" in p_ else "– | ")
                 + f"{', '.join(p_.get('exported') or [])} | {_fmt_s((p_.get('metrics') or {}).get('perplexity'))} |")
    L += ["", "## What did not run here, and why", ""]
    for sh, pr in res["not_run"].items():
        L.append(f"- harness cell `{sh}` (1 block, 2 ranks): the planner predicts "
                 f"{pr['train'] / GiB:.1f} GiB (training), {pr['foresight_pbs_full'] / GiB:.1f} GiB (ForeSight + PBS full "
                 f"prune step) and {pr['sparsegpt'] / GiB:.1f} GiB (SparseGPT) per rank, x 2 ranks, on a 24 GiB machine "
                 "shared with 4 other agents (5-10 GiB available during these runs); CPU time at load 15-20 is the "
                 "second limit (the 1/4-width cell took 15 min wall).")
    done_micro = {(m["matrix"], m["part"]) for m in res["micro"]}
    missing = [f"{mm} {pp}" for mm in MATRICES for pp in PARTS if (mm, pp) not in done_micro]
    if missing:
        L.append("- single-matrix parts not measured (memory guard: predicted peak + 3 GiB headroom was not "
                 "available, or no time left): " + ", ".join(missing) + ".")
    e = res["extrapolation"]
    g = e["gpu_assumptions"]
    L += ["", "## Extrapolation: Llama-2-70B (80 blocks) on 8 x 8 GPUs (arithmetic; GPU constants are assumptions)", "",
          "Assumed per GPU: " + ", ".join(f"{k} = {v}" for k, v in g.items()) + ".", "",
          f"Calibration {e['calibration_tokens']:,} tokens (128 x {e['seq_len']}), split over {e['world']} ranks.", "",
          "| part (per block) | FLOPs | seconds |", "|---|---|---|"]
    fl = e["per_block_flops"]
    fmap = {"calibration forwards (bf16, /W)": fl["calibration forwards"],
            "statistics XᵀX full (fp32, /W)": fl["statistics full"], "statistics diag (fp32, /W)": fl["statistics diag"],
            "PBS full dense solve, A·H first (down_proj owner)": fl["PBS full dense new (down_proj)"],
            "PBS full dense solve, previous (U⊙P)·H (down_proj owner)": fl["PBS full dense previous (down_proj)"],
            "SparseGPT solve (down_proj owner)": fl["SparseGPT (down_proj)"]}
    for k, v in e["per_block_seconds"].items():
        L.append(f"| {k} | {('%.3g' % fmap[k]) if k in fmap else '– (bytes, see assumptions)'} | {v:.3g} |")
    tr = e["training"]
    L += ["", f"One prune step of all 80 blocks: **{e['prune_step_s']['pbs full (statistics full)']:.0f} s** with "
          f"full-Hessian PBS (the reduction of each block's 3.3 GB down_proj XᵀX into its owner dominates), "
          f"**{e['prune_step_s']['pbs diagonal / final step (statistics diag)']:.1f} s** with diagonal PBS / the final step.",
          "", f"Training with configs/llama70b_health.yaml on the shipped health data: {tr['train_tokens']:,} tokens "
          "(SmolLM2 tokenizer; Llama-2's is not available offline) -> "
          f"{tr['rows']} rows of {e['seq_len']}, global batch {tr['global_batch']} -> {tr['steps_per_epoch']} step(s) per "
          f"epoch x {tr['epochs']} epochs = {tr['total_steps']} optimizer steps of {tr['step_s']:.1f} s "
          f"({tr['flops_per_token']:.3g} FLOPs/token); in-loop prune steps before steps {tr['inloop_prune_steps']}, "
          "then the final prune step.", "",
          "| variant | time vs plain LoRA | vs LoRA then one prune step | training tokens per epoch for 1.10x |",
          "|---|---|---|---|"]
    for k, v in e["time_ratio"].items():
        tk = e["tokens_for_1.10x"]["pbs full" if "full" in k else "pbs diagonal"]
        L.append(f"| {k} | {v['vs_plain_lora']:.2f}x | {v['vs_lora_then_prune']:.2f}x | {tk / 1e6:.1f} M |")
    (RESULTS / "rehearsal_70b.md").write_text("\n".join(L) + "\n")


# ============================================================================ entry point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--matrices", nargs="*", default=list(MATRICES))
    m.add_argument("--parts", nargs="*", default=list(PARTS))
    m.add_argument("--rows", type=int, default=None, help="build and time this many rows of W (scaled)")
    m.add_argument("--fresh", action="store_true")
    h = sub.add_parser("harness")
    h.add_argument("--shape", default="70b-quarter", choices=list(SHAPES))
    h.add_argument("--layers", type=int, default=2)
    h.add_argument("--seq-len", type=int, default=64)
    h.add_argument("--calib-samples", type=int, default=4)
    h.add_argument("--steps", type=int, default=2)
    h.add_argument("--prune-runs", nargs="*", default=ALL_RUNS, choices=ALL_RUNS)
    h.add_argument("--fresh", action="store_true")
    pl = sub.add_parser("pipeline")
    pl.add_argument("--shape", default="70b-quarter", choices=list(SHAPES))
    pl.add_argument("--layers", type=int, default=1)
    pl.add_argument("--method", default="foresight")
    pl.add_argument("--pbs", default="full")
    pl.add_argument("--fresh", action="store_true")
    sub.add_parser("report")
    mp = sub.add_parser("_micro_part")
    mp.add_argument("matrix")
    mp.add_argument("part")
    mp.add_argument("rows", type=int, nargs="?", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "_micro_part":
        print(json.dumps(micro_part(args.matrix, args.part, rows=args.rows)))
        return 0
    if args.cmd == "harness":
        harness(args.shape, args.layers, args.seq_len, args.calib_samples, args.steps, args.prune_runs,
                fresh=args.fresh)
        return 0
    if args.cmd == "pipeline":
        rec = pipeline(args.shape, args.layers, args.method, args.pbs, fresh=args.fresh)
        return 0 if rec["rc"] == 0 else 1
    if args.cmd == "report":
        res = report()
        write(res)
        print((RESULTS / "rehearsal_70b.md").read_text())
        return 0
    if args.cmd == "micro":
        micro(args.matrices, args.parts, fresh=args.fresh, rows=args.rows)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
