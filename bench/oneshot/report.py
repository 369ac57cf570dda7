"""Turn the cached cells into bench/results/<name>.json and .md (standard library only)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

IMPL_NAME = {"ours": "xpert-dist", "llmc": "llm-compressor"}


def planned_cells(calibs) -> list[dict]:
    """Every cell, in run (priority) order: dense; per calibration set and pattern, ours then llm-compressor."""
    cells = [{"calib": None, "pattern": None, "impl": "ours", "method": "dense"}]
    for calib in calibs:
        for pattern in common.PATTERNS:
            # the methods both implement first (the comparison is the headline), then ours alone
            cells += [{"calib": calib, "pattern": pattern, "impl": "ours", "method": m} for m in common.LLMC_METHODS]
            cells += [{"calib": calib, "pattern": pattern, "impl": "llmc", "method": m} for m in common.LLMC_METHODS]
            cells += [{"calib": calib, "pattern": pattern, "impl": "ours", "method": m} for m in common.OUR_METHODS
                      if m not in common.LLMC_METHODS]
    for c in cells:
        c["key"] = common.cell_key(c["calib"], c["pattern"], c["impl"], c["method"])
    return cells


def load_cells(quick: bool) -> dict[str, dict]:
    out = {}
    for p in sorted((common.cache_dir(quick) / "cells").glob("*.json")):
        cell = common.read_json(p)
        out[cell["key"]] = cell
    return out


def _fmt(x, spec=".2f", missing="—"):
    return missing if x is None else format(x, spec)


def _pct(a, b):
    return None if a is None or b is None else 100.0 * (a / b - 1.0)


def build(quick: bool) -> dict:
    s = common.settings(quick)
    cells = load_cells(quick)
    inputs = common.read_json(common.cache_dir(quick) / "inputs.json") or {}
    dense = cells.get("dense")
    rows, comparisons = [], []
    for plan in planned_cells(common.CALIBS):
        c = cells.get(plan["key"])
        row = {k: plan[k] for k in ("key", "calib", "pattern", "impl", "method")}
        row["status"] = "done" if c else "not run"
        if c:
            for k in ("ppl", "prune_seconds", "prune_cpu_seconds", "peak_rss_mib", "sparsity_mean", "nm_violations", "load_avg",
                      "versions", "mask_sha256"):
                row[k] = c.get(k)
            if dense and plan["method"] != "dense":
                row["ppl_vs_dense_pct"] = {n: _pct(c["ppl"][n], dense["ppl"][n]) for n in common.EVALS}
        rows.append(row)
    by_key = {r["key"]: r for r in rows}
    for calib in common.CALIBS:
        for pattern in common.PATTERNS:
            for m in common.LLMC_METHODS:
                ours = by_key[common.cell_key(calib, pattern, "ours", m)]
                theirs = by_key[common.cell_key(calib, pattern, "llmc", m)]
                comp = {"calib": calib, "pattern": pattern, "method": m,
                        "status": "done" if ours["status"] == theirs["status"] == "done" else "not run"}
                if comp["status"] == "done":
                    comp["time_ratio_ours_over_theirs"] = ours["prune_seconds"] / theirs["prune_seconds"]
                    comp["cpu_time_ratio_ours_over_theirs"] = ours["prune_cpu_seconds"] / theirs["prune_cpu_seconds"]
                    comp["rss_ratio_ours_over_theirs"] = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
                    comp["ppl_diff_pct_ours_vs_theirs"] = {n: _pct(ours["ppl"][n], theirs["ppl"][n])
                                                           for n in common.EVALS}
                    comp["meets_goal"] = (comp["time_ratio_ours_over_theirs"] <= 1.0 and
                                          all(v <= 1.0 for v in comp["ppl_diff_pct_ours_vs_theirs"].values()))
                comparisons.append(comp)
    return {
        "benchmark": "one-shot pruning, SmolLM2-135M (fp32, CPU)",
        "settings": {**s, "sparsity": common.SPARSITY, "calib_batch_size": common.BATCH_SIZE,
                     "eval_sets": common.EVALS, "seed": common.SEED},
        "inputs": inputs,
        "dense": dense and {"ppl": dense["ppl"]},
        "cells": rows,
        "comparison": comparisons,
    }


def markdown(res: dict) -> str:
    s = res["settings"]
    ev = list(common.EVALS)
    lines = [f"# {res['benchmark']}", "",
             f"Sparsity {s['sparsity']:.0%}; calibration {s['calib_samples']} × {s['calib_len']} tokens "
             f"(seeded windows, seed {s['seed']}, batch {s['calib_batch_size']}), the same tensor for both "
             f"implementations; perplexity on the first {s['eval_windows']} windows × {s['eval_len']} tokens of "
             f"WikiText-2 test and of the MedQuAD held-out tail, the same windows and the same scorer "
             f"(xpert_dist.eval.perplexity) for every cell. Prune time: the prune call alone (model already "
             f"loaded); peak RSS: the whole prune process (model load + prune + save), one process per cell.", ""]
    d = res["dense"]
    lines += [f"Dense: WikiText-2 {d['ppl']['wikitext2']:.3f}, MedQuAD {d['ppl']['medquad']:.3f}." if d
              else "Dense: not run.", ""]
    lines += ["## All cells", "",
              "| calib | pattern | method | implementation | ppl WikiText-2 (Δ vs dense) | ppl MedQuAD (Δ vs dense) "
              "| prune s (CPU s) | peak RSS MiB | sparsity | load avg |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["cells"]:
        if r["method"] == "dense":
            continue
        name = IMPL_NAME[r["impl"]]
        if r["status"] != "done":
            lines.append(f"| {r['calib']} | {r['pattern']} | {r['method']} | {name} | not run | not run | — | — | — | — |")
            continue
        ppl = [f"{r['ppl'][n]:.3f} ({_fmt(r.get('ppl_vs_dense_pct', {}).get(n), '+.1f')}%)" for n in ev]
        la = r.get("load_avg") or {}
        lines.append(f"| {r['calib']} | {r['pattern']} | {r['method']} | {name} | {ppl[0]} | {ppl[1]} | "
                     f"{r['prune_seconds']:.0f} ({r['prune_cpu_seconds']:.0f}) | {r['peak_rss_mib']:.0f} | {r['sparsity_mean']:.4f} | "
                     f"{_fmt(la.get('start'), '.1f')}→{_fmt(la.get('end'), '.1f')} |")
    lines += ["", "## xpert-dist vs llm-compressor (same model, tokens, windows)", "",
              "| calib | pattern | method | time ours/theirs (CPU time) | peak RSS ours/theirs | Δppl WikiText-2 "
              "| Δppl MedQuAD | goal (time ≤ 1, Δppl ≤ 1%) |",
              "|---|---|---|---|---|---|---|---|"]
    for c in res["comparison"]:
        if c["status"] != "done":
            lines.append(f"| {c['calib']} | {c['pattern']} | {c['method']} | not run | — | — | — | — |")
            continue
        dp = c["ppl_diff_pct_ours_vs_theirs"]
        lines.append(f"| {c['calib']} | {c['pattern']} | {c['method']} | {c['time_ratio_ours_over_theirs']:.2f} "
                     f"({c['cpu_time_ratio_ours_over_theirs']:.2f}) | "
                     f"{c['rss_ratio_ours_over_theirs']:.2f} | {dp['wikitext2']:+.2f}% | {dp['medquad']:+.2f}% | "
                     f"{'met' if c['meets_goal'] else 'NOT met'} |")
    same: dict[str, list[str]] = {}
    for r in res["cells"]:
        if r.get("mask_sha256"):
            same.setdefault(r["mask_sha256"], []).append(f"{r['method']} ({IMPL_NAME[r['impl']]}, {r['calib']}, "
                                                         f"{r['pattern']})")
    dup = [v for v in same.values() if len(v) > 1]
    if dup:
        lines += ["", "Bit-identical masks (all 210 matrices): " + "; ".join(" = ".join(v) for v in dup) + "."]
    lines += ["", "Δppl = ours / theirs − 1 (negative: ours is better). Load avg: the machine's 1-minute load "
              "average at the start and end of the prune (2 cores, shared): timings under load > 2 are noisy.", ""]
    return "\n".join(lines)


def write(quick: bool) -> tuple[Path, Path]:
    res = build(quick)
    name = common.settings(quick)["name"]
    jp, mp = common.RESULTS / f"{name}.json", common.RESULTS / f"{name}.md"
    common.write_json(jp, res)
    mp.write_text(markdown(res))
    return jp, mp


if __name__ == "__main__":
    for p in write("--quick" in sys.argv):
        print(p)
