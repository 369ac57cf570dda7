"""How far runs of the same job drift apart between launchers, by calibration precision (``prune.calib_dtype``).

The product promises that one process, the deepspeed launcher on one ZeRO-3 rank and torchrun on two give the
same export up to float noise (``tests/train/test_zero3_real.py::test_zero3_smollm2_end_to_end`` bounds the
perplexity gap at 1%). bf16-autocast calibration forwards make a prune step 0.74-0.80x (``bench/prune_step.py``)
but round every block's activations to 8 bits of mantissa, which turns the launchers' float noise into mask
flips that the OBS solve amplifies. This runs that test's three launches (same job, same data: SmolLM2 through
``launchers/run.py`` with the shipped pruning, 3 optimizer steps, 16 calibration windows of 64 tokens, 32
perplexity windows) once per calibration dtype and records, against the single process of the same dtype: the
perplexity gap, the share of mask entries that differ, and the relative difference of the OBS update on rows whose
masks agree (the test's three measures).

    python bench/calib_dtype_drift.py [--dtypes auto,bfloat16]

Writes ``bench/results/calib_dtype_drift.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpert_dist.utils.atomic import atomic_write_text  # noqa: E402

OUT = ROOT / "bench" / "results"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the end-to-end test's job (tests/train/test_zero3_real.py::test_zero3_smollm2_end_to_end)
JOB = ["train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1", "data.calib_samples=16", "data.seq_len=64",
       "lora.dropout=0", "eval.tasks=[]", "eval.perplexity_windows=32", "eval.perplexity_seq_len=64",
       "prune.offload=none", "eval.base_reference=false"]
LAUNCHES = (("python", 1), ("deepspeed", 1), ("torchrun", 2))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, world: int, out: Path, overrides: list[str]) -> dict:
    bindir = os.path.dirname(sys.executable)
    args = ["launchers/run.py", "--no-progress", "--config", "configs/default_health.yaml", f"output_dir={out}",
            *overrides]
    if launcher == "python":
        cmd = [sys.executable, *args]
    elif launcher == "torchrun":
        cmd = [os.path.join(bindir, "torchrun"), "--nproc_per_node", str(world), "--master_port", str(_port()), *args,
               "--ds_config", str(ZERO3)]
    else:
        cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(world), "--master_port", str(_port()), *args,
               "--ds_config", str(ZERO3)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} x{world} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    res["_wall_s"] = time.perf_counter() - t
    return res


def exported(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(out / "model" / "model.safetensors")
    return {n: w.float() for n, w in sd.items() if n.endswith(".weight") and n.split(".")[-2] in LINEARS}


def base_weights() -> dict[str, torch.Tensor]:
    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import load_model

    model = load_model(ModelConfig(name_or_path="smollm2"))
    return {n: p.detach().float() for n, p in model.named_parameters()
            if n.endswith(".weight") and n.split(".")[-2] in LINEARS}


def compare(base: dict, ref: dict, got: dict) -> tuple[float, float]:
    """(share of mask entries that differ, ||W - W_ref|| / ||W_ref - W_base ⊙ M_ref|| on rows whose masks agree)."""
    diff = total = 0
    num = den = 0.0
    for name, w0 in base.items():
        a, b = ref[name], got[name]
        diff += int(((a != 0) != (b != 0)).sum())
        total += a.numel()
        rows = ((a != 0) == (b != 0)).all(dim=1)
        num += float((a[rows] - b[rows]).square().sum())
        den += float((a[rows] - w0[rows] * (a[rows] != 0)).square().sum())
    return diff / total, (num / den) ** 0.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="auto,bfloat16", help="prune.calib_dtype values, comma-separated")
    args = ap.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in ("auto", "float32", "bfloat16", "float16")]
    if not dtypes or bad:
        ap.error(f"--dtypes: unknown calibration dtype(s) {bad or dtypes} (auto, float32, bfloat16, float16)")
    base = base_weights()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for dtype in dtypes:
            runs = {}
            for launcher, world in LAUNCHES:
                out = Path(work) / f"{dtype}-{launcher}{world}"
                runs[(launcher, world)] = launch(launcher, world, out, [*JOB, f"prune.calib_dtype={dtype}"])
                print(f"[calib_dtype_drift] {dtype} {launcher} x{world}: perplexity "
                      f"{runs[(launcher, world)]['metrics']['perplexity']:.4f} "
                      f"({runs[(launcher, world)]['_wall_s']:.0f} s)", flush=True)
            ref = runs[("python", 1)]
            ref_w = exported(Path(work) / f"{dtype}-python1")
            for launcher, world in LAUNCHES[1:]:
                res = runs[(launcher, world)]
                frac, rel = compare(base, ref_w, exported(Path(work) / f"{dtype}-{launcher}{world}"))
                rows.append({"calib_dtype": dtype, "launcher": launcher, "world_size": world,
                             "perplexity": res["metrics"]["perplexity"],
                             "reference_perplexity": ref["metrics"]["perplexity"],
                             "perplexity_gap": res["metrics"]["perplexity"] / ref["metrics"]["perplexity"] - 1,
                             "mask_entries_differing": frac, "obs_update_difference": rel,
                             "wall_s": res["_wall_s"], "reference_wall_s": ref["_wall_s"]})
    res = {"job": JOB, "launches": [f"{a} x{b}" for a, b in LAUNCHES], "torch_threads_per_process": 1,
           "bound_in_tests": {"perplexity_gap": 0.01}, "rows": rows}
    md = ["Same job, three launchers (`tests/train/test_zero3_real.py::test_zero3_smollm2_end_to_end`'s: SmolLM2, "
          "the shipped pruning, 3 optimizer steps, 16 calibration windows of 64 tokens, 32 perplexity windows), "
          "each against the single process of the same calibration dtype (`python bench/calib_dtype_drift.py`). "
          "The test bounds the perplexity gap at 1%.", "",
          "| prune.calib_dtype | launcher | single-process ppl | ppl | gap | mask entries differing | "
          "OBS update difference |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['calib_dtype']} | {r['launcher']} x{r['world_size']} | {r['reference_perplexity']:.4f} | "
                  f"{r['perplexity']:.4f} | {r['perplexity_gap']:+.2%} | {r['mask_entries_differing']:.2e} | "
                  f"{r['obs_update_difference']:.3f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "calib_dtype_drift.json", json.dumps(res, indent=2))
    atomic_write_text(OUT / "calib_dtype_drift.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
