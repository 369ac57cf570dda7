"""Micro cells: single matrices at the exact 70B widths, one part of a prune step per subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.planner_validation import hwm_bytes, reset_peak, rss_bytes
from bench.rehearsal_70b.common import CACHE, GiB, MALLOC_ENV, REPO, _atomic_json

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
            p = subprocess.run([sys.executable, "-m", "bench.rehearsal_70b", "_micro_part", mname, part, str(n_rows)],
                               env=env, cwd=REPO, capture_output=True, text=True)
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
