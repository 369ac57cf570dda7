"""Time ``prune.reconstruct=obs`` for one transformer block of SmolLM2-135M's shapes.

Side by side in one run: the column sweep (SparseGPT's loop over columns, the implementation this
replaced, kept here as the reference) and ``maths.reconstruct.obs_reconstruct`` (batched triangular
solves per column block) at several block sizes, with one ``obs_factor`` per module and with the factor
shared by the modules that read the same input (q/k/v, gate/up), as ``Pruner.prune_block`` does.
Every variant's result is compared with the sweep's (max relative difference).

    python bench/obs_speed.py [--threads 1] [--repeats 3] [--dtype float32]

Writes ``bench/results/obs_speed.{json,md}``. The statistics are synthetic (``XᵀX`` of correlated
Gaussian inputs, 8192 tokens); the masks are 50% unstructured by magnitude: the solve's cost depends
on the shapes and the mask density, not on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xpert_dist.maths.reconstruct import obs_factor, obs_reconstruct  # noqa: E402
from xpert_dist.maths.sparsegpt import damped_factor  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64
MODULES = {"q_proj": (576, 576, "attn_in"), "k_proj": (192, 576, "attn_in"), "v_proj": (192, 576, "attn_in"),
           "o_proj": (576, 576, "o_in"), "gate_proj": (1536, 576, "mlp_in"), "up_proj": (1536, 576, "mlp_in"),
           "down_proj": (576, 1536, "down_in")}
HERE = os.path.dirname(os.path.abspath(__file__))


def column_sweep(W, H, keep, *, blocksize=128, percdamp=0.01, dtype=torch.float32):
    """The reference: SparseGPT's per-column OBS sweep for a given mask (the previous implementation)."""
    Wc = W.to(dtype).clone()
    Hinv = damped_factor(H, percdamp, dtype, 3)[0]
    pruned, cols = ~keep, W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1, Hinv1, P1 = Wc[:, i1:i2].clone(), torch.zeros_like(Wc[:, i1:i2]), Hinv[i1:i2, i1:i2], pruned[:, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(P1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        Wc[:, i1:i2] = W1
        if i2 < cols:
            Wc[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Wc[pruned] = 0.0
    return Wc


def make_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    stats, weights = {}, {}
    for name, (out, inp, group) in MODULES.items():
        if group not in stats:
            mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
            X = torch.randn(8192, inp, generator=g) @ mix
            stats[group] = X.T @ X
        W = torch.randn(out, inp, generator=g) * 0.05
        keep = W.abs() >= W.abs().flatten().kthvalue(W.numel() // 2).values
        weights[name] = (W, keep)
    return stats, weights


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--blocksizes", default="8,16,32,128")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    stats, weights = make_problem(0)
    print(f"obs_speed: one SmolLM2 block (7 modules), {a.dtype}, {a.threads} thread(s), best of {a.repeats}",
          flush=True)

    ref_t, ref = timed(lambda: {n: column_sweep(W, stats[MODULES[n][2]], k, dtype=dtype)
                               for n, (W, k) in weights.items()}, a.repeats)
    rows = [{"variant": "column sweep (previous), blocksize 128", "seconds": ref_t, "max_rel_diff": 0.0}]
    print(f"  sweep: {ref_t:.3f} s", flush=True)

    def rel(out):
        return max(float((out[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)

    for bs in [int(b) for b in a.blocksizes.split(",")]:
        t, out = timed(lambda: {n: obs_reconstruct(W, stats[MODULES[n][2]], k, blocksize=bs, dtype=dtype)
                                for n, (W, k) in weights.items()}, a.repeats)
        rows.append({"variant": f"batched solve, blocksize {bs}, factor per module", "seconds": t,
                     "max_rel_diff": rel(out)})
        print(f"  blocksize {bs}: {t:.3f} s", flush=True)

    def shared():
        factors = {g: obs_factor(H, dtype=dtype) for g, H in stats.items()}
        return {n: obs_reconstruct(W, stats[MODULES[n][2]], k, dtype=dtype, factor=factors[MODULES[n][2]])  # default blocksize
                for n, (W, k) in weights.items()}
    t, out = timed(shared, a.repeats)
    rows.append({"variant": "batched solve, blocksize 32 (default), factor shared per input group",
                 "seconds": t, "max_rel_diff": rel(out)})
    print(f"  default, shared factor: {t:.3f} s", flush=True)
    for r in rows:
        r["speedup_vs_sweep"] = ref_t / r["seconds"]

    os.makedirs(a.out, exist_ok=True)
    meta = {"threads": a.threads, "repeats": a.repeats, "dtype": a.dtype, "torch": torch.__version__,
            "shapes": {n: [o, i] for n, (o, i, _) in MODULES.items()}, "rows": rows}
    for name, text in (("obs_speed.json", json.dumps(meta, indent=1)),
                       ("obs_speed.md", "\n".join(
                           [f"# prune.reconstruct=obs, one SmolLM2-135M block ({a.dtype}, {a.threads} thread(s), "
                            f"best of {a.repeats}; `python bench/obs_speed.py`)", "",
                            "| variant | seconds | × vs sweep | max rel. diff vs sweep |", "|---|---|---|---|"]
                           + [f"| {r['variant']} | {r['seconds']:.3f} | {r['speedup_vs_sweep']:.2f} | "
                              f"{r['max_rel_diff']:.1e} |" for r in rows]) + "\n")):
        tmp = os.path.join(a.out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(a.out, name))
    print(open(os.path.join(a.out, "obs_speed.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
