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


def micro_part(matrix: str, part: str, n_tok: int = 512, r: int = 8, old_rows: int = 256) -> dict:
    """Time one part for one matrix in this process (run in a fresh subprocess by ``micro``)."""
    import torch

    from xpert_dist.maths import masks, pbs, scores, sparsegpt
    from xpert_dist.stats.capture import accumulate

    torch.set_num_threads(int(os.environ.get("REHEARSAL_THREADS", "1")))
    out_f, in_f = MATRICES[matrix]
    X, W, A = _micro_inputs(out_f, in_f, r, n_tok)
    t0, c0 = time.perf_counter(), time.process_time()
    H = accumulate(X, "full", torch.float32, None)  # the statistic as the pipeline accumulates it
    stat_s, stat_cpu = time.perf_counter() - t0, time.process_time() - c0
    del X
    d = H.diagonal().clone()
    keep = masks.select_mask(scores.wanda_scores(W, d), 0.5, "output")
    reset_peak()
    rss0 = rss_bytes()
    rows = out_f
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
        rows = min(old_rows, out_f)
        Ws, ks = W[:rows], keep[:rows]
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


def micro(matrices, parts, fresh=False) -> list[dict]:
    out = []
    for mname in matrices:
        for part in parts:
            key = f"rh70-micro-{mname}-{part}"
            path = CACHE / f"{key}.json"
            if path.is_file() and not fresh:
                out.append(json.loads(path.read_text()))
                print(f"[cached] {key}", flush=True)
                continue
            env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            t0 = time.time()
            p = subprocess.run([sys.executable, __file__, "_micro_part", mname, part], env=env,
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
    sg = estimate(plan_spec(cell, "sparsegpt", "off"))
    stats_bytes = sum(t.bytes for t in fs.terms if t.name.startswith("reduced statistics held"))
    return {"train": fs.peaks["train"]["host"], "foresight_pbs_full": fs.peaks["prune"]["host"],
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
    for phase, key in (("train", "train"), ("foresight_pbs_full_2", "foresight_pbs_full"), ("sparsegpt", "sparsegpt")):
        meas = max(r["phases"][phase]["peak"] for r in rec["ranks"])
        rows.append({"phase": phase, "measured_bytes": meas, "predicted_bytes": pred[key],
                     "err_pct": 100.0 * (pred[key] - meas) / meas})
    return {"rows": rows, "prediction": pred, "statistics_bytes": statistics_bytes(cell)}


# ============================================================================ entry point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--matrices", nargs="*", default=list(MATRICES))
    m.add_argument("--parts", nargs="*", default=list(PARTS))
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
    mp = sub.add_parser("_micro_part")
    mp.add_argument("matrix")
    mp.add_argument("part")
    args = ap.parse_args(argv)
    if args.cmd == "_micro_part":
        print(json.dumps(micro_part(args.matrix, args.part)))
        return 0
    if args.cmd == "harness":
        harness(args.shape, args.layers, args.seq_len, args.calib_samples, args.steps, args.prune_runs,
                fresh=args.fresh)
        return 0
    if args.cmd == "pipeline":
        rec = pipeline(args.shape, args.layers, args.method, args.pbs, fresh=args.fresh)
        return 0 if rec["rc"] == 0 else 1
    if args.cmd == "micro":
        micro(args.matrices, args.parts, fresh=args.fresh)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
