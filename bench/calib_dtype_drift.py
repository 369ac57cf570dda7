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


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpert_dist.launch.export_diff import (base_linears, launcher_command, mask_disagreement,  # noqa: E402
                                          pruned_linears, update_difference)
from xpert_dist.utils.atomic import atomic_write_text  # noqa: E402

OUT = ROOT / "bench" / "results"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
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
    args = ["--no-progress", "--config", "configs/default_health.yaml", f"output_dir={out}", *overrides]
    cmd = launcher_command(launcher, world, args, ZERO3, _port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} x{world} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    res["_wall_s"] = time.perf_counter() - t
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="auto,bfloat16", help="prune.calib_dtype values, comma-separated")
    args = ap.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in ("auto", "float32", "bfloat16", "float16")]
    if not dtypes or bad:
        ap.error(f"--dtypes: unknown calibration dtype(s) {bad or dtypes} (auto, float32, bfloat16, float16)")
    base = base_linears()
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
            ref_w = pruned_linears(Path(work) / f"{dtype}-python1")
            for launcher, world in LAUNCHES[1:]:
                res = runs[(launcher, world)]
                got_w = pruned_linears(Path(work) / f"{dtype}-{launcher}{world}")
                frac, rel = mask_disagreement(ref_w, got_w), update_difference(base, ref_w, got_w)
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
