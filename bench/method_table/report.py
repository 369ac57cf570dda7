"""The method table's report: retention against the dense cell, Wilson intervals, the validation choice
and the issue's goals, as JSON rows and markdown. Pure functions of the cells' results."""
from __future__ import annotations

import json

import cells as cells_mod  # noqa: E402  (cells_mod.BUDGET: the budget run.py --budget selects)
from cells import BASELINES, EFFICIENTXPERT, METHODS, OUT, VALID, VALID_WINDOWS, parse_cell_name


def wilson(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on ``n`` items."""
    if not n:
        return float("nan"), float("nan")
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((acc * (1 - acc) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def _train_peak(res: dict) -> float:
    """Peak RSS up to the end of the final prune (training and pruning; before export and evaluation)."""
    mem = res.get("memory", {})
    return mem.get("peak_rss_after_final_prune_mb") or mem.get("peak_rss_after_train_mb") or mem["peak_rss_mb"]


def prune_step_summary(report: dict) -> dict:
    """One prune step of a cell: when, how long, and how far it moved the mask (``moved``: the share of
    a matrix's previously kept weights that this step pruned, ``Pruner.step``; none at the first step)."""
    moved = list(report.get("moved", {}).values())
    return {"step": report.get("step"), "final": report.get("final"), "seconds": report.get("seconds"),
            "moved_max": max(moved) if moved else None, "moved_mean": sum(moved) / len(moved) if moved else None}


def timed_whole(res: dict) -> bool:
    """Whether a run's timing covers all of its optimizer steps: a resumed run times only the steps after its
    resume point (``timed_from_step``; older results: fewer ``step_seconds`` than ``train.max_steps``)."""
    if res.get("timed_from_step"):
        return False
    steps, total = res.get("step_seconds"), res.get("config", {}).get("train", {}).get("max_steps")
    return not (steps is not None and total and len(steps) < total)


def summarise(cells: dict[str, dict]) -> dict:
    from xpert_dist.eval.retention import retention

    table = {}
    for name, res in cells.items():
        domain = name.split("-")[0]
        dense = cells.get(f"{domain}-dense_lora")
        mets = dict(res.get("metrics", {}))
        for key in [k for k in mets if k.endswith("_acc") and f"{k[:-4]}_n" in mets]:
            mets[f"{key}_ci95"] = list(wilson(mets[key], int(mets[f"{key[:-4]}_n"])))
        row = {"metrics": mets, "timing": res.get("timing", {}), "memory": res.get("memory", {}),
               "sparsity": res.get("config", {}).get("prune", {}).get("sparsity") if "-s" in name else 0.0}
        if res.get("prune_reports"):
            row["prune_steps"] = [prune_step_summary(r) for r in res["prune_reports"]]
        if dense:
            valid, dense_valid = res["metrics"].get("valid_perplexity"), dense["metrics"].get("valid_perplexity")
            ev = {k: v for k, v in res.get("metrics", {}).items() if k != "valid_perplexity"}
            row["retention"] = retention(ev, {k: v for k, v in dense["metrics"].items() if k != "valid_perplexity"})
            row["valid_retention"] = dense_valid / valid if valid and dense_valid else None
            row["timed_in_part"] = not (timed_whole(res) and timed_whole(dense))
            t_d = dense["timing"].get("train_s", 0) + dense["timing"].get("prune_s", 0)
            t_r = res["timing"].get("train_s", 0) + res["timing"].get("prune_s", 0)
            row["time_vs_lora"] = t_r / t_d if t_d else None
            c_d = dense["timing"].get("train_cpu_s", 0) + dense["timing"].get("prune_cpu_s", 0)
            c_r = res["timing"].get("train_cpu_s", 0) + res["timing"].get("prune_cpu_s", 0)
            row["cpu_time_vs_lora"] = c_r / c_d if c_d and c_r else None
            if row["timed_in_part"]:  # one of the two resumed: its times cover only its last sitting
                row["time_vs_lora"] = row["cpu_time_vs_lora"] = None
            row["peak_rss_vs_lora"] = res["memory"]["peak_rss_mb"] / dense["memory"]["peak_rss_mb"]
            row["train_peak_rss_vs_lora"] = _train_peak(res) / _train_peak(dense)
        table[name] = row
    return table


def carry_over(recorded: dict, table: dict, shipped: dict) -> dict:
    """Rows of the committed table (``recorded``, same budget) whose cells are not in ``table`` (their cache
    folders are not on this machine: a fresh clone or another machine), marked ``recorded: true``. A row of a
    method no longer in ``METHODS`` is dropped; an ``xpert_default`` row only stays while its ``run_config``
    is what the domain config ships now (``shipped``: cell name -> that config; a row without one is dropped)."""
    out = {}
    for name, row in recorded.items():
        method = parse_cell_name(name)[1]
        if name in table or method not in METHODS:
            continue
        if method == "xpert_default" and (row.get("run_config") is None or row["run_config"] != shipped.get(name)):
            continue
        out[name] = {**row, "recorded": True}
    return out


def renamed_defaults(recorded: dict, table: dict, shipped: dict, config_of) -> dict:
    """Recorded ``xpert_default`` rows (no cache folder here) that the shipped default no longer is, under the
    method whose run config they hold (``config_of(domain, method, sparsity)``: a method's comparable run
    config), as a cached cell is moved; none where that row exists already or no method matches."""
    out = {}
    for name, row in recorded.items():
        domain, method, pct = parse_cell_name(name)
        if method != "xpert_default" or name in table or not row.get("run_config") or \
                row["run_config"] == shipped.get(name):
            continue
        for other in METHODS:
            if other == "xpert_default" or config_of(domain, other, pct / 100) != row["run_config"]:
                continue
            target = f"{domain}-{other}-s{pct}"
            if target not in table and target not in recorded and target not in out:
                out[target] = {**row, "recorded": True}
                print(f"[method_table] {name} (recorded) ran what is now {target}: kept under that name", flush=True)
            break
    return out


def default_twins(rows: dict, shipped: dict) -> dict:
    """``xpert_default`` rows for cells that have none, copied from a row (``rows``: this sitting's and the
    recorded ones) whose ``run_config`` is what the domain config ships there (``shipped``: xpert_default cell
    name -> that config), as ``run.py`` copies a finished twin's folder."""
    out = {}
    for name, cfg in shipped.items():
        if (name in rows and not rows[name].get("recorded")) or cfg is None:  # a twin here beats a recorded row
            continue
        domain, _, pct = parse_cell_name(name)
        for other, row in sorted(rows.items()):
            if other != name and other.startswith(f"{domain}-") and other.endswith(f"-s{pct}") and row.get("run_config") == cfg:
                out[name] = {**row, "twin_of": other}
                print(f"[method_table] {name}: same run config as {other}, its row is this cell's", flush=True)
                break
    return out


# SparseGPT -> masked LoRA calibrated on the 128 windows the shipped default's four prune steps see in all
FAIRNESS_TWIN = "sparsegpt_masked_lora_c128"


def _versus(items) -> str:
    items = list(items)
    return " vs " + ", ".join(items) if items else " (no baseline measured yet)"


def goals(table: dict) -> list[str]:
    """The issue's goals, checked against what was measured (only for cells that exist)."""
    lines = []
    for key in sorted({f"{d}|{p}" for d, _, p in map(parse_cell_name, table) if p is not None}):
        domain, pct = key.split("|")
        ret = {m: table[f"{domain}-{m}-s{pct}"]["retention"]["domain_retention"]
               for m in METHODS if f"{domain}-{m}-s{pct}" in table and "retention" in table[f"{domain}-{m}-s{pct}"]}
        ours = {m: r for m, r in ret.items() if m in EFFICIENTXPERT}
        if not ours:
            continue
        # perplexity retention: the goal's metric and the less noisy one (an accuracy on 200-400 items moves
        # 0.25-0.5 points per item); domain retention (perplexity and accuracy averaged) is reported beside it
        ppl = {m: table[f"{domain}-{m}-s{pct}"]["retention"].get("perplexity") for m in ret}
        best_ppl = max((m for m in ours if ppl.get(m) is not None), key=lambda m: ppl[m], default=None)
        best = max(ours, key=ours.get)
        beats = ""
        if best_ppl:
            beats = (f"best EfficientXpert variant by perplexity retention `{best_ppl}` {ppl[best_ppl]:.1%}"
                     + (" (goal >= 90%: " + ("met" if ppl[best_ppl] >= 0.90 else "not met") + ")" if pct == "40" else "")
                     + _versus(f"{m} {ppl[m]:.1%}" for m in BASELINES if ppl.get(m)))
        beats += (f"; by domain retention (perplexity and accuracy averaged) `{best}` {ours[best]:.1%}"
                  + _versus(f"{m} {ret[m]:.1%}" for m in BASELINES if m in ret))
        if ppl.get("xpert_default") is not None and any(ppl.get(m) is not None for m in BASELINES):
            margins = {m: ppl["xpert_default"] - ppl[m] for m in BASELINES if ppl.get(m) is not None}
            beats += ("; shipped default `xpert_default` perplexity retention " + f"{ppl['xpert_default']:.1%}: "
                      + ", ".join(f"{'+' if v >= 0 else ''}{100 * v:.1f} points vs {m}"
                                  f" ({'goal >= +2 met' if v >= 0.02 else 'goal >= +2 not met'})"
                                  for m, v in margins.items()))
        twin = ppl.get(FAIRNESS_TWIN)
        if ppl.get("xpert_default") is not None and twin is not None:
            v = ppl["xpert_default"] - twin
            beats += (f"; vs the fairness twin {FAIRNESS_TWIN} (as many calibration windows as the default's four "
                      f"steps) {twin:.1%}: {'+' if v >= 0 else ''}{100 * v:.1f} points")
        default = table.get(f"{domain}-xpert_default-s{pct}")
        if default is not None:  # accuracy: not worse than any baseline beyond the default's 95% interval
            acc_key = next((k for k in default["metrics"] if k.endswith("_acc")), None)
            ci = default["metrics"].get(f"{acc_key}_ci95") if acc_key else None
            if ci:
                worse = [m for m in (*BASELINES, FAIRNESS_TWIN) if f"{domain}-{m}-s{pct}" in table
                         and table[f"{domain}-{m}-s{pct}"]["metrics"].get(acc_key, 0) > ci[1]]
                beats += (f"; `xpert_default` {acc_key} {default['metrics'][acc_key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]: "
                          + (f"worse beyond its interval than {', '.join(worse)}" if worse
                             else "no baseline above its 95% interval"))
        timed = "xpert_default" if default is not None else best  # the time and memory of what ships
        row = dict(table[f"{domain}-{timed}-s{pct}"])
        # the side-by-side run of what ships: timed as ``xpert_default`` or as the cell it is a twin of
        shipped_as = ["xpert_default"] + ([parse_cell_name(default["twin_of"])[1]] if default and default.get("twin_of") else [])
        side_by_side = _timing_pair(domain, pct, shipped_as)
        if side_by_side:  # the side-by-side measurement (alternating or concurrent) replaces the cells' drifting timings
            timed = side_by_side["method"]
            row.update(time_vs_lora=side_by_side["time_vs_lora"], cpu_time_vs_lora=side_by_side["cpu_vs_lora"],
                       train_peak_rss_vs_lora=side_by_side["peak_rss_vs_lora"])
        lines.append(f"- {domain} @ {pct}%: {beats}"
                     + (f"; `{timed}` time {row['time_vs_lora']:.2f}x LoRA wall, "
                        f"{row.get('cpu_time_vs_lora') or float('nan'):.2f}x CPU (goal <= 1.10x)"
                        if row.get("time_vs_lora") else f"; `{timed}` time: no ratio (a resumed run)")
                     + ", training peak RSS "
                     + f"{row.get('train_peak_rss_vs_lora', float('nan')):.3f}x LoRA (goal <= 1.02x)"
                     + (" [time and memory: side by side, bench/results/timing.md]" if side_by_side
                        else " [time and memory: this cell vs the dense cell, run at different moments]"))
    return lines


def validation_choice(table: dict) -> list[str]:
    """Per domain and sparsity: the EfficientXpert variants ranked by validation perplexity retention,
    with the baselines' beside them (what chooses the shipped defaults)."""
    lines = []
    for key in sorted({(d, p) for d, _, p in map(parse_cell_name, table) if p is not None}):
        domain, pct = key
        val = {m: table[f"{domain}-{m}-s{pct}"].get("valid_retention") for m in METHODS
               if f"{domain}-{m}-s{pct}" in table}
        ours = sorted(((v, m) for m, v in val.items() if m in EFFICIENTXPERT and v), reverse=True)
        peers = [(m, val[m]) for m in BASELINES if val.get(m)]
        if ours:
            lines.append(f"- {domain} @ {pct}%: " + ", ".join(f"`{m}` {v:.1%}" for v, m in ours)
                         + ("; baselines " + ", ".join(f"{m} {v:.1%}" for m, v in peers) if peers else ""))
    return lines


def _timing_pair(domain: str, pct: str, methods: list[str]) -> dict | None:
    """The side-by-side measurement of bench/method_table/timing.py for this domain and sparsity of the first of
    ``methods`` it timed (``--method`` may name several, comma-separated), if any."""
    path = OUT / "timing.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("budget") != cells_mod.BUDGET:  # measured at another budget: not this table's
        return None
    args = data["args"]
    if args["domain"] != domain or int(round(args["sparsity"] * 100)) != int(pct):
        return None
    timed = args["method"].split(",")
    for method in methods:
        row = data["summary"].get(method)
        if method in timed and row and "time_vs_lora" in row:
            return {**row, "method": method}
    return None


def mask_movement(table: dict) -> list[str]:
    """Markdown rows: how long each prune step took and how far it moved the mask."""
    rows = []
    for name, row in sorted(table.items()):
        steps = row.get("prune_steps") or []
        if not any(not st["final"] for st in steps):  # one prune step, then the final re-check: nothing moves
            continue
        parts = []
        for st in steps:
            moved = ("" if st["moved_max"] is None
                     else f", moved {100 * st['moved_max']:.3f}% / {100 * st['moved_mean']:.3f}%")
            parts.append(f"{'final check' if st['final'] else 'prune ' + str(st['step'] + 1)} {st['seconds']:.0f} s{moved}")
        rows.append(f"| {name} | " + "; ".join(parts) + " |")
    return ["| cell | prune steps (seconds, mask moved: max / mean) |", "|---|---|", *rows] if rows else []


def markdown(table: dict) -> str:
    def f(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "–"

    def x(ratio, spec):  # a ratio: "1.23×", or "–" when there is none
        return f(ratio, spec) + "×" if isinstance(ratio, (int, float)) else "–"

    lines = ["| cell | validation ppl (ret.) | domain retention | perplexity (ret.) | accuracy [95% Wilson] (ret.) | "
             "wall time / LoRA | CPU time / LoRA | train+prune peak RSS / LoRA | whole-run peak RSS / LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(table.items(), key=lambda kv: (kv[0].split("-")[0], kv[1]["sparsity"] or 0, kv[0])):
        ret = row.get("retention", {})
        mets = row["metrics"]
        acc_key = next((k for k in mets if k.endswith("_acc")), None)
        ci = mets.get(f"{acc_key}_ci95") if acc_key else None
        ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(f"| {name} | {f(mets.get('valid_perplexity'), '.2f')} ({f(row.get('valid_retention'), '.1%')}) "
                     f"| {f(ret.get('domain_retention'), '.1%')} | {f(mets.get('perplexity'), '.2f')} "
                     f"({f(ret.get('perplexity'), '.1%')}) | {f(mets.get(acc_key), '.3f')}{ci_s} "
                     f"({f(ret.get(acc_key), '.1%')}) | {x(row.get('time_vs_lora'), '.2f')} | "
                     f"{x(row.get('cpu_time_vs_lora'), '.2f')} | "
                     f"{x(row.get('train_peak_rss_vs_lora'), '.3f')} | {x(row.get('peak_rss_vs_lora'), '.3f')} |")
    out = "\n".join(lines) + "\n"
    out += ("\nTime and memory columns compare each cell with its domain's dense cell, run at another moment "
            "on a machine shared with other work: wall and CPU times drift by up to 2-4x between cells. "
            "The side-by-side measurement is `bench/results/timing.md` (bench/method_table/timing.py).\n")
    partial = sorted(n for n, row in table.items() if row.get("timed_in_part"))
    if partial:
        out += ("\nNo time ratio (–) where the cell or its dense reference resumed from a checkpoint (its times cover "
                "only the last sitting): " + ", ".join(partial) + ".\n")
    carried = sorted(n for n, row in table.items() if row.get("recorded"))
    if carried:
        out += (f"\n{len(carried)} rows are as recorded in the committed table (their cells' cache folders were "
                "not on the machine that wrote this one; same budget, and an `xpert_default` row only while its run "
                "config is what the domain config ships): " + ", ".join(carried) + ".\n")
    v = validation_choice(table)
    if v:
        out += ("\n## Defaults chosen on the validation splits\n\nPerplexity retention on "
                + ", ".join(f"`{a}`" for a in VALID.values()) + f" ({VALID_WINDOWS} windows; held out of the "
                "training data, never a test file), EfficientXpert variants best first:\n\n" + "\n".join(v) + "\n")
    m = mask_movement(table)
    if m:
        out += ("\n## Prune steps: time and mask movement\n\nPer cell that prunes inside the loop: each prune step's "
                "seconds and the share of a matrix's previously kept weights it pruned (largest over the "
                "model's matrices / mean); the final check applies the final mask (the mask was final after the last prune).\n\n" + "\n".join(m) + "\n")
    g = goals(table)
    if g:
        out += "\n## Goals (issue 10) against these measurements\n\n" + "\n".join(g) + "\n"
    return out



# the shipped default against the baselines the issue names (and the 128-window fairness twin), in the figure
FIGURE_RUNS = {"xpert_default": "shipped default", "sparsegpt_masked_lora_c128": "SparseGPT → masked LoRA (128 w.)",
               "sparsegpt_masked_lora": "SparseGPT → masked LoRA", "wanda_masked_lora": "Wanda → masked LoRA",
               "lora_sparsegpt": "LoRA → SparseGPT", "lora_wanda": "LoRA → Wanda"}


def figure_values(table: dict) -> dict[str, dict[str, float]]:
    """``{run label: {cell label: validation retention in %}}`` for :func:`plot_grouped_bars`; cells a run
    lacks are left out (a gap in the figure)."""
    out: dict[str, dict[str, float]] = {}
    for method, label in FIGURE_RUNS.items():
        for name, row in sorted(table.items()):
            domain, m, pct = parse_cell_name(name)
            if m == method and pct is not None and row.get("valid_retention") is not None:
                out.setdefault(label, {})[f"{domain} {pct}%"] = 100.0 * row["valid_retention"]
    order = sorted({c for v in out.values() for c in v})
    return {k: {c: v[c] for c in order if c in v} for k, v in out.items()}


def write_figure(table: dict, path):
    """bench/results/method_table.png: validation perplexity retention per cell, one bar per run; returns the
    path (None when no run has a cell)."""
    from xpert_dist.report.plots import plot_grouped_bars

    return plot_grouped_bars(figure_values(table), path, "Validation perplexity retention (dense LoRA = 100%)",
                             "retention, %", value_labels=".1f", legend_below=True)
