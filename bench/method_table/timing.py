#!/usr/bin/env python
"""Time and peak memory of EfficientXpert against plain LoRA, measured side by side on a quiet machine.

    python bench/method_table/timing.py [--repeats 2] [--method xpert_default[,OTHER...]] [--domain health]
    python bench/method_table/timing.py --concurrent --method xpert_default   # LoRA and the method at once

The method table's cells also record time and memory, but they run for hours while other work shares
the CPU, so their wall and even CPU times drift by 2x between cells. Here the runs alternate
(LoRA, EfficientXpert method(s), LoRA, ...) with the method table's budget and data and without evaluation (which
is identical work for both), so they see the same conditions; the ratio of medians is reported.
On a machine whose speed drifts within the hour, alternating is not enough (plain LoRA took 862 s and 1,336 s in
two sittings here); ``--concurrent`` starts each repeat's runs at the same moment, each pinned to its own core with
one torch thread, so they share whatever the machine does, and rotates the cores between repeats so that a faster
core favours no run. Its steps before the first prune step (the same work in both runs) are the control: their
ratio is ~1.00x when the two cores gave the same speed. The run that finishes first leaves its partner the memory
bandwidth for the rest (the partner's tail is uncontended): a bias in the slower run's favour, of at most the
contention's share of its last steps. And the method's prune steps (memory-bound) slow the LoRA steps that run
beside them: measured 2026-12-07, LoRA's steps 26-100 (the same work as the method's) took 1.05-1.12x the method's,
so a concurrent ratio understates the method's cost by about that share (README, time section).
Cached per run like the method table: a later invocation with one more ``--method`` runs only that one
(the table's ``finished`` column says when each run ended, so runs of different sittings are told apart); a
concurrent repeat with one run missing runs again as a whole, so its runs are always each other's partners.
Writes ``bench/results/timing.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as table  # noqa: E402  (the method table: budget, methods, model)

CACHE = table.ROOT / "bench" / "results" / "cache" / "timing" / table.budget_tag()  # one folder per budget
NO_EVAL = ["eval.tasks=[]", "eval.perplexity_windows=0"]


def _finished(out: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime((out / "results.json").stat().st_mtime))


def _name(domain: str, method: str, sparsity: float, k: int) -> str:
    return f"{domain}-{method}-s{int(round(sparsity * 100))}-r{k}"


def run_once(domain: str, method: str, sparsity: float, k: int, cache: Path = CACHE, cpus: str | None = None) -> dict:
    name = _name(domain, method, sparsity, k)
    out = cache / name
    if (out / "results.json").is_file():
        return {**json.loads((out / "results.json").read_text()), "finished": _finished(out)}
    res = table.launch(name, out, domain, [f"prune.sparsity={sparsity}", *table.cells.BUDGET, *table.METHODS[method],
                                           *table.MODEL, *NO_EVAL], cache, cpus)
    if res is None:
        raise SystemExit(f"[timing] {name} failed; see {cache / f'{name}.log'}")
    return {**res, "finished": _finished(out)}


def core_plan(methods: list[str], cores: list[int], k: int) -> dict[str, str]:
    """The core each run of concurrent repeat ``k`` is pinned to: run i on core (i + k) mod n, so that over n
    repeats every run has had every core."""
    if len(methods) > len(cores):
        raise ValueError(f"{len(methods)} concurrent runs need as many cores, this process may use {len(cores)}")
    return {m: str(cores[(i + k) % len(cores)]) for i, m in enumerate(methods)}


def run_concurrent(domain: str, methods: list[str], sparsity: float, k: int, cores: list[int]) -> dict[str, dict]:
    """Repeat ``k``'s runs started together, each on its own core; all from the cache when all are there, else
    all run again (a cached run's partner must be the run it shared the machine with)."""
    cache = CACHE / "concurrent"
    outs = {m: cache / _name(domain, m, sparsity, k) for m in methods}
    if not all((o / "results.json").is_file() for o in outs.values()):
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
    plan = core_plan(methods, cores, k)
    print(f"[timing] repeat {k + 1}: " + ", ".join(f"{m} on core {c}" for m, c in plan.items()), flush=True)
    with ThreadPoolExecutor(len(methods)) as pool:
        futures = {m: pool.submit(run_once, domain, m, sparsity, k, cache, plan[m]) for m in methods}
        return {m: {**f.result(), "core": int(plan[m])} for m, f in futures.items()}


def _time(r: dict) -> float:
    return r["timing"]["train_s"] + r["timing"]["prune_s"]


def summary(runs: dict[str, list[dict]]) -> dict:
    def med(rs, key):
        return statistics.median(key(r) for r in rs)

    out = {}
    for method, rs in runs.items():
        out[method] = {
            "runs": len(rs),
            "train_s": med(rs, lambda r: r["timing"]["train_s"]),
            "prune_s": med(rs, lambda r: r["timing"]["prune_s"]),
            "time_s": med(rs, _time),
            "cpu_s": med(rs, lambda r: r["timing"]["train_cpu_s"] + r["timing"]["prune_cpu_s"]),
            "peak_rss_train_prune_mb": med(rs, table._train_peak),
            "prune_steps": len(rs[0].get("prune_reports", [])),
            "steps": len(rs[0].get("loss_history", [])),
            "finished": [r.get("finished") for r in rs],
        }
    base = out.get("dense_lora")
    for method, row in out.items():
        if base:
            row["time_vs_lora"] = row["time_s"] / base["time_s"]
            row["cpu_vs_lora"] = row["cpu_s"] / base["cpu_s"]
            row["peak_rss_vs_lora"] = row["peak_rss_train_prune_mb"] / base["peak_rss_train_prune_mb"]
        if method != "dense_lora" and runs.get("dense_lora"):
            row["phases"] = phases(runs[method], runs["dense_lora"], runs[method][0].get("prune_steps") or [])
            # each sitting's own ratios (run k against plain LoRA's run k), beside the ratio of the medians
            row["by_sitting"] = [
                {"time_vs_lora": _time(r) / _time(b), "peak_rss_vs_lora": table._train_peak(r) / table._train_peak(b),
                 "phases": phases([r], [b], r.get("prune_steps") or []),
                 **({"cores": {"method": r["core"], "lora": b["core"]}} if "core" in r else {})}
                for r, b in zip(runs[method], runs["dense_lora"])]
    return out


def phases(rs: list[dict], lora: list[dict], prune_steps: list[int]) -> dict | None:
    """Training wall seconds (medians over repeats) of the method's optimizer steps in three phases, and of
    plain LoRA's over the same steps: ``unpruned`` (up to the first in-loop prune step: the same work as plain
    LoRA's, so its ratio is the control, how far the machine's speed differed between the runs), ``dense``
    (up to the last in-loop prune step: dense adapter on the pruned base, again LoRA's work) and ``masked``
    (after it: the masked adapter, where the mask becomes final there). A prune step listed as ``k`` runs after
    ``k`` optimizer steps. None where the run has no in-loop prune step or a run recorded no per-step times."""
    def span(r: dict, lo: int, hi: int) -> float:
        return sum(sec for k, sec in r["step_seconds"] if lo <= k <= hi)

    if not prune_steps or not all(r.get("step_seconds") for r in rs + lora):
        return None
    steps = len(rs[0]["step_seconds"])
    out = {}
    for label, lo, hi in (("unpruned", 1, prune_steps[0]), ("dense", prune_steps[0] + 1, prune_steps[-1]),
                          ("masked", prune_steps[-1] + 1, steps)):
        if lo > hi:
            continue
        m, b = (statistics.median(span(r, lo, hi) for r in x) for x in (rs, lora))
        out[label] = {"steps": [lo, hi], "method_s": m, "lora_s": b, "vs_lora": m / b if b else None}
    return out


def markdown(s: dict, args) -> str:
    how = ("started together, each pinned to its own core, the cores rotated between repeats; a repeat's runs are "
           "each other's partners" if args.concurrent else
           "alternating within one sitting; cached runs are reused, and `finished` says when each ran")
    lines = [f"Domain {args.domain}, sparsity {args.sparsity:.0%}, budget {' '.join(table.cells.BUDGET)}; medians of "
             f"{args.repeats} runs each ({how}), no evaluation, "
             f"{f'{args.threads} torch thread(s)' if args.threads else 'one torch thread per core'}.", "",
             "| run | steps | prune steps | train s | prune s | wall / LoRA | CPU / LoRA | peak RSS (train+prune) MiB | "
             "peak RSS / LoRA | finished (UTC) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in s.items():
        lines.append(f"| {m} | {r['steps']} | {r['prune_steps']} | {r['train_s']:.1f} | {r['prune_s']:.1f} | "
                     f"{r.get('time_vs_lora', float('nan')):.3f}× | {r.get('cpu_vs_lora', float('nan')):.3f}× | "
                     f"{r['peak_rss_train_prune_mb']:.0f} | {r.get('peak_rss_vs_lora', float('nan')):.3f}× | "
                     f"{', '.join(f for f in r['finished'] if f)} |")
    for m, r in s.items():
        if len(r.get("by_sitting") or []) > 1:
            lines.append("")
            lines.append(f"{m}, each {'repeat' if args.concurrent else 'sitting'} against plain LoRA's run of the same "
                         f"{'repeat' if args.concurrent else 'sitting'}: " + "; ".join(
                f"{k + 1}: {b['time_vs_lora']:.3f}× wall, {b['peak_rss_vs_lora']:.3f}× peak RSS"
                + ("" if not b["phases"] else ", phases " + ", ".join(
                    f"{label} {p['vs_lora']:.3f}×" for label, p in b["phases"].items()))
                for k, b in enumerate(r["by_sitting"])) + ".")
    split = [(m, r["phases"]) for m, r in s.items() if r.get("phases")]
    if split:
        lines += ["", "Training time by phase (prune steps excluded), against plain LoRA over the same steps: up to the "
                  "first in-loop prune step (unpruned: the same work as plain LoRA's, so its ratio is the control for "
                  "how the machine's speed differed between the runs), up to the last one (dense adapter on the pruned "
                  "base: again plain LoRA's work) and after it (the masked adapter, where the mask became final "
                  "there).", "",
                  "| run | phase | steps | run s | LoRA s | / LoRA |", "|---|---|---|---|---|---|"]
        for m, ph in split:
            for label, p in ph.items():
                lines.append(f"| {m} | {label} | {p['steps'][0]}-{p['steps'][1]} | {p['method_s']:.1f} | "
                             f"{p['lora_s']:.1f} | {p['vs_lora']:.3f}× |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", default="health")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--method", default="xpert_default",  # the shipped EfficientXpert default
                    help="comma-separated methods of the method table, timed against dense_lora")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: one per core; one with --concurrent)")
    ap.add_argument("--concurrent", action="store_true",
                    help="start each repeat's runs together, each pinned to its own core (drift-robust)")
    args = ap.parse_args()
    if args.concurrent:
        if args.threads not in (None, 1):
            ap.error(f"--concurrent pins each run to one core: --threads must be 1, got {args.threads}")
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        table.THREADS.append(args.threads)
    table.MODEL.extend(table.model_override())
    methods = [m for m in args.method.split(",") if m]
    unknown = [m for m in methods if m not in table.METHODS]
    if unknown or not methods:
        ap.error(f"--method: unknown method(s) {unknown or args.method!r}; see bench/method_table/cells.py")
    runs: dict[str, list[dict]] = {"dense_lora": [], **{m: [] for m in methods if m != "dense_lora"}}
    cores = sorted(os.sched_getaffinity(0))
    if args.concurrent and len(runs) > len(cores):
        ap.error(f"--concurrent runs plain LoRA and {len(runs) - 1} method(s) at once: that needs {len(runs)} cores, "
                 f"this machine gives {len(cores)}")
    for k in range(args.repeats):
        if args.concurrent:
            for method, r in run_concurrent(args.domain, list(runs), args.sparsity, k, cores).items():
                runs[method].append(r)
        else:
            for method in runs:
                runs[method].append(run_once(args.domain, method, args.sparsity, k))
    s = summary(runs)
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    table.OUT.mkdir(parents=True, exist_ok=True)
    md = markdown(s, args)
    atomic_write_json(table.OUT / "timing.json", {"args": vars(args), "budget": table.cells.BUDGET, "summary": s})
    atomic_write_text(table.OUT / "timing.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
