"""One-shot pruning benchmark: xpert-dist (dense, magnitude, Wanda, SparseGPT, ForeSight) vs llm-compressor
(Wanda, SparseGPT) on the real SmolLM2-135M, 50% unstructured and 2:4, WikiText-2 or health calibration.

    python bench/oneshot/run.py [--calib general|health] [--quick] [--max-minutes M] [--report-only]

Every cell (calibration set, method, pattern, implementation) runs in its own processes, under
`nice -n 10`: a prune process (our venv, or .venv-llmc for llm-compressor) that writes the pruned
linear weights, then an evaluation process (our venv, the same scorer for everyone). Finished cells
are cached as JSON under bench/results/cache/<name>/cells/, so a rerun resumes where the last one
stopped; the table is rewritten after every cell to bench/results/<name>.{json,md}
(<name> = oneshot, or oneshot_quick with --quick: 8 × 256 calibration tokens, 4 × 256 eval tokens).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402

NICE = ["nice", "-n", "10"]


def run_child(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd`` (output to ``log``); (exit code, wall seconds, the child's own peak RSS in MiB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(NICE + cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=common.REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # nice execs the command: this is the Python process itself
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def run_cell(cell: dict, quick: bool) -> dict:
    cache = common.cache_dir(quick)
    key = cell["key"]
    logs, work = cache / "logs", cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    q = ["--quick"] if quick else []
    result = {k: cell[k] for k in ("key", "calib", "pattern", "impl", "method")}
    eval_cmd = [str(common.OURS_PYTHON), str(common.HERE / "evaluate.py"), "--out", str(work / f"{key}.eval.json")] + q
    weights = work / f"{key}.safetensors"
    if cell["method"] != "dense":
        python, script = ((common.OURS_PYTHON, "prune_ours.py") if cell["impl"] == "ours"
                          else (common.LLMC_PYTHON, "prune_llmc.py"))
        meta = work / f"{key}.prune.json"
        cmd = [str(python), str(common.HERE / script), "--calib", cell["calib"], "--pattern", cell["pattern"],
               "--method", cell["method"], "--out", str(weights), "--meta", str(meta)] + q
        load0 = os.getloadavg()[0]
        rc, wall, rss = run_child(cmd, logs / f"{key}.prune.log")
        load1 = os.getloadavg()[0]
        if rc != 0:
            raise RuntimeError(f"prune process exited {rc}:\n{tail(logs / f'{key}.prune.log')}")
        m = common.read_json(meta)
        result.update(prune_seconds=m["prune_seconds"], prune_cpu_seconds=m["prune_cpu_seconds"],
                      prune_process_seconds=wall, peak_rss_mib=rss,
                      load_avg={"start": load0, "end": load1}, prune_meta=m)
        if "llmcompressor_version" in m:
            result["versions"] = {"llmcompressor": m["llmcompressor_version"], "transformers": m["transformers_version"]}
        eval_cmd += ["--weights", str(weights), "--pattern", cell["pattern"]]
    rc, wall, _ = run_child(eval_cmd, logs / f"{key}.eval.log")
    if rc != 0:
        raise RuntimeError(f"evaluation process exited {rc}:\n{tail(logs / f'{key}.eval.log')}")
    e = common.read_json(work / f"{key}.eval.json")
    result.update(ppl=e["ppl"], eval_seconds=e["eval_seconds"], windows=e["windows"],
                  sparsity_mean=e.get("sparsity_mean"), sparsity_min=e.get("sparsity_min"),
                  sparsity_max=e.get("sparsity_max"), nm_violations=e.get("nm_violations"),
                  mask_sha256=e.get("mask_sha256"))
    weights.unlink(missing_ok=True)  # ~430 MB each; the cell's numbers are what is kept
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", choices=common.CALIBS, help="only this calibration set (default: both, general first)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny token budgets, separate cache/outputs")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new cell after this many minutes")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the table from the cached cells")
    ap.add_argument("--only", nargs="*", default=None, help="run only these cell keys (see the JSON)")
    args = ap.parse_args()

    if not args.report_only:
        if not common.LLMC_PYTHON.is_file():
            print(f"warning: {common.LLMC_PYTHON} missing: llm-compressor cells will fail "
                  "(see bench/oneshot/README.md for the venv recipe)", flush=True)
        if not (common.cache_dir(args.quick) / "inputs.json").is_file() or not common.model_dir().is_dir():
            subprocess.run([str(common.OURS_PYTHON), str(common.HERE / "prepare.py")] +
                           (["--quick"] if args.quick else []), check=True, cwd=common.REPO)
        t_start = time.monotonic()
        cells_dir = common.cache_dir(args.quick) / "cells"
        plan = report.planned_cells([args.calib] if args.calib else common.CALIBS)
        if args.only:
            plan = [c for c in plan if c["key"] in args.only]
        for cell in plan:
            path = cells_dir / f"{cell['key']}.json"
            if path.is_file():
                continue
            if args.max_minutes is not None and time.monotonic() - t_start > 60 * args.max_minutes:
                print(f"time budget of {args.max_minutes} min spent; stopping before {cell['key']}", flush=True)
                break
            print(f"[{time.strftime('%H:%M:%S')}] cell {cell['key']} ...", flush=True)
            t0 = time.monotonic()
            try:
                result = run_cell(cell, args.quick)
            except RuntimeError as exc:
                common.write_json(cells_dir / f"{cell['key']}.failed", {"key": cell["key"], "error": str(exc)})
                print(f"  FAILED: {exc}", flush=True)
                continue
            common.write_json(path, result)
            (cells_dir / f"{cell['key']}.failed").unlink(missing_ok=True)
            print(f"  done in {time.monotonic() - t0:.0f} s: ppl {result['ppl']}"
                  + (f", prune {result['prune_seconds']:.0f} s, peak RSS {result['peak_rss_mib']:.0f} MiB"
                     if "prune_seconds" in result else ""), flush=True)
            report.write(args.quick)
    jp, mp = report.write(args.quick)
    print(mp.read_text())
    print(f"written: {jp} and {mp}")


if __name__ == "__main__":
    main()
