"""Write a shift analysis result (``shift.summarise`` + extras) as files a person can look at:
``shift.json`` (everything), ``shift_summary.csv`` (overall / per layer / per module values),
``shift_matrices.csv`` (every matrix), heat maps and per-layer curves (PNG) and ``shift.md``.

Nothing is recomputed here: the page renders from the result dict, so ``write_shift_outputs`` can be
called again on a stored ``shift.json`` (``rewrite_from_json``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path

from ..config import LLAMA_LINEARS
from ..report import plots as rplots
from ..report.results import atomic_write_text, md_table
from ..utils.atomic import atomic_write_json
from . import plots
from .metrics import changed_share

log = logging.getLogger(__name__)

METRIC_LABEL = {"iou": "IoU of kept sets", "spearman": "Spearman rank correlation of scores"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _sp_label(sp) -> str:
    return "all" if sp is None else f"{float(sp):g}"


def _f(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _csv(rows: list[list], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _order(d: dict, by: str) -> dict:
    """Layer keys in numeric order, module keys in Llama order (a JSON round trip sorts keys as text)."""
    if by == "layer":
        return {str(k): d[k] for k in sorted(d, key=lambda k: int(k))}
    order = [m for m in LLAMA_LINEARS if m in d] + sorted(set(d) - set(LLAMA_LINEARS))
    return {m: d[m] for m in order}


def normalise(result: dict) -> dict:
    """``result`` with every ``by_layer`` / ``by_module`` mapping in display order (in place)."""
    items = list(result.get("results", []))
    items += [s for mv in (result.get("movement") or {}).values() for s in mv.get("steps", [])]
    for r in items:
        r["by_layer"] = _order(r.get("by_layer", {}), "layer")
        r["by_module"] = _order(r.get("by_module", {}), "module")
    return result


def _comparison_kinds(result: dict) -> list[str]:
    return list(dict.fromkeys(c[0] for c in result["comparisons"]))


def _results(result: dict, comparison: str | None = None, metric: str | None = None, sparsity="any") -> list[dict]:
    out = []
    for r in result["results"]:
        if comparison is not None and r["comparison"] != comparison:
            continue
        if metric is not None and r["metric"] != metric:
            continue
        if sparsity != "any" and r["sparsity"] != sparsity:
            continue
        out.append(r)
    return out


def _short_pair(r: dict) -> str:
    """``before:health | before:legal`` -> ``health vs legal``; mixed phases keep them."""
    (pa, da), (pb, db) = r["a"].split(":", 1), r["b"].split(":", 1)
    if pa == pb:
        return f"{da} vs {db}"
    if da == db:
        return f"{da}: {pa} vs {pb}"
    return f"{da} ({pa}) vs {db} ({pb})"


def write_csvs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    summary, matrices = [], []
    for r in result["results"]:
        head = [r["comparison"], r["a"], r["b"], r["metric"], _sp_label(r["sparsity"])]
        summary.append(head + ["all", "all", r["overall"]])
        summary += [head + ["layer", k, v] for k, v in r["by_layer"].items()]
        summary += [head + ["module", k, v] for k, v in r["by_module"].items()]
        matrices += [head + [name, v] for name, v in r["per_matrix"].items()]
    for run, mv in (result.get("movement") or {}).items():
        for s in mv["steps"]:
            head = ["movement", run, f"step {s['step']}", "moved", "-"]
            summary.append(head + ["all", "all", s["overall"]])
            summary += [head + ["layer", k, v] for k, v in s["by_layer"].items()]
            summary += [head + ["module", k, v] for k, v in s["by_module"].items()]
            matrices += [head + [name, v] for name, v in s["per_matrix"].items()]
    base = ["comparison", "a", "b", "metric", "sparsity"]
    p1 = Path(atomic_write_text(out_dir / "shift_summary.csv", _csv(summary, base + ["scope", "key", "value"])))
    p2 = Path(atomic_write_text(out_dir / "shift_matrices.csv", _csv(matrices, base + ["matrix", "value"])))
    return p1, p2


def write_figures(result: dict, out_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """All PNGs; returns ``{section: [(caption, file name), ...]}`` for the page."""
    figs: dict[str, list[tuple[str, str]]] = {"heatmaps": [], "curves": [], "movement": [], "adaptation": []}
    random_iou = {float(k): v for k, v in result.get("random_iou", {}).items()}
    sparsities = sorted({r["sparsity"] for r in result["results"] if r["metric"] == "iou"})
    sp_spearman = sorted({r["sparsity"] for r in result["results"] if r["metric"] == "spearman"},
                         key=lambda s: -1 if s is None else s)
    for metric, sps in (("iou", sparsities), ("spearman", sp_spearman)):
        for sp in sps:
            curve_panels = {}
            for comp in _comparison_kinds(result):
                rs = _results(result, comp, metric, sp)
                if not rs:
                    continue
                name = f"heat_{metric}_{_slug(comp)}_{'all' if sp is None else _slug(f'{sp:g}')}.png"
                extra = f", sparsity {sp:g}" if sp is not None else ""
                ref = f" (random masks: {random_iou[sp]:.3f})" if metric == "iou" and sp in random_iou else ""
                title = f"{METRIC_LABEL[metric]}: {comp}{extra}{ref}"
                if plots.heatmap_panels({_short_pair(r): r["per_matrix"] for r in rs}, out_dir / name, title,
                                        label=metric, cmap="viridis"):
                    figs["heatmaps"].append((title, name))
                curve_panels[comp] = {_short_pair(r): ([int(k) for k in r["by_layer"]], list(r["by_layer"].values()))
                                      for r in rs}
            name = f"layers_{metric}_{'all' if sp is None else _slug(f'{sp:g}')}.png"
            extra = f", sparsity {sp:g}" if sp is not None else ""
            hl = {f"random masks ({random_iou[sp]:.3f})": random_iou[sp]} if metric == "iou" and sp in random_iou else None
            title = f"{METRIC_LABEL[metric]} per layer{extra}" + (" (pooled over modules)" if metric == "iou" else
                                                               " (mean over modules)")
            if plots.layer_curves(curve_panels, out_dir / name, title, ylabel=metric, hlines=hl):
                figs["curves"].append((title, name))
    for run, mv in (result.get("movement") or {}).items():
        steps = mv["steps"]
        if not steps:
            continue
        name = f"movement_{_slug(run)}.png"
        title = f"Mask movement between prune steps: {run} (share of the kept set that changed)"
        if plots.heatmap_panels({f"step {s['step']}{' (final)' if s['final'] else ''}": s["per_matrix"] for s in steps},
                                out_dir / name, title, label="moved", vmin=0.0, cmap="magma"):
            figs["movement"].append((title, name))
        name = f"movement_layers_{_slug(run)}.png"
        if plots.layer_curves({run: {f"step {s['step']}": ([int(k) for k in s["by_layer"]], list(s["by_layer"].values()))
                                     for s in steps}}, out_dir / name, f"Mask movement per layer: {run}",
                              ylabel="moved share"):
            figs["movement"].append((f"Mask movement per layer: {run}", name))
    curves = {d: a["loss_history"] for d, a in (result.get("adaptation") or {}).items() if a.get("loss_history")}
    if curves and rplots.plot_loss(curves, out_dir / "adaptation_loss.png", title="Domain LoRA adaptation loss"):
        figs["adaptation"].append(("Domain LoRA adaptation loss", "adaptation_loss.png"))
    return figs


def _settings_table(s: dict) -> str:
    model = s["model"].get("name_or_path") if s["model"].get("tiny") is None else f"tiny random Llama {s['model']['tiny']}"
    rows = [["model", model], ["domains", ", ".join(f"{d['name']} (`{d['spec']}`)" for d in s["domains"])],
            ["method / group / variant", f"{s['method']} / {s['group']} / {s['variant']}"],
            ["sparsities", ", ".join(f"{x:g}" for x in s["sparsities"])],
            ["calibration", f"{s['calibration']}: {s['calib_samples']} windows x {s['calib_seq_len']} tokens per domain, "
                            f"seed {s['seed']}"],
            ["adaptation", "none" if not s["adapt_steps"] else
             f"{', '.join(s.get('adapt_domains') or [d['name'] for d in s['domains']])}: {s['adapt_steps']} LoRA steps (r={s['lora']['r']}, alpha={s['lora']['alpha']:g}), batch "
             f"{s['adapt_batch_size']} x {s['adapt_seq_len']} tokens, lr {s['adapt_lr']:g}"]]
    return md_table(["setting", "value"], rows)


def key_numbers(result: dict) -> list[str]:
    """One sentence per comparison kind and sparsity: mean IoU over its pairs, and where it is lowest."""
    lines = []
    random_iou = {float(k): v for k, v in result.get("random_iou", {}).items()}
    for comp in _comparison_kinds(result):
        for sp in sorted({r["sparsity"] for r in _results(result, comp, "iou")}):
            rs = _results(result, comp, "iou", sp)
            mean = sum(r["overall"] for r in rs) / len(rs)
            mods: dict[str, list[float]] = {}
            lays: dict[str, list[float]] = {}
            for r in rs:
                for m, v in r["by_module"].items():
                    mods.setdefault(m, []).append(v)
                for k, v in r["by_layer"].items():
                    lays.setdefault(k, []).append(v)
            low_m = min(mods, key=lambda m: sum(mods[m]) / len(mods[m]))
            low_l = min(lays, key=lambda k: sum(lays[k]) / len(lays[k]))
            sp_rs = _results(result, comp, "spearman", None) or _results(result, comp, "spearman", sp)
            rho = sum(r["overall"] for r in sp_rs) / len(sp_rs) if sp_rs else math.nan
            lines.append(f"`{comp}` at sparsity {sp:g}: mean IoU {mean:.3f} over {len(rs)} pair(s), i.e. "
                         f"{100 * changed_share(mean):.1f} % of a kept set differs "
                         f"(random masks: IoU {random_iou.get(sp, math.nan):.3f}); lowest in `{low_m}` "
                         f"({sum(mods[low_m]) / len(mods[low_m]):.3f}) and layer {low_l} "
                         f"({sum(lays[low_l]) / len(lays[low_l]):.3f}); mean Spearman {_f(rho)}.")
    return lines


def render_markdown(result: dict, figs: dict[str, list[tuple[str, str]]], command: str | None = None) -> str:
    s = result["settings"]
    sparsities = sorted({r["sparsity"] for r in result["results"] if r["metric"] == "iou"})
    random_iou = {float(k): v for k, v in result.get("random_iou", {}).items()}
    out = ["# Domain structural shift", "", _settings_table(s), ""]
    if command:
        out += ["Command:", "", "```bash", command, "```", ""]
    out += ["How to read: **IoU** = |kept in both| / |kept in either| of two masks at the same sparsity "
            "(1 = identical masks; masks at one sparsity keep equally many weights, so (1 - IoU) / (1 + IoU) of a "
            "kept set is not kept by the other mask; two independent random masks give "
            + ", ".join(f"{random_iou[sp]:.3f} at {sp:g}" for sp in sparsities if sp in random_iou)
            + "); overall and per-layer IoU are pooled over matrices (Σ intersections / Σ unions). "
            "**Spearman** = rank correlation of the per-weight scores of a matrix (1 = same order), "
            "averaged over matrices. Sets are named `phase:domain`: `before` = base model calibrated on the "
            "domain, `after` = the domain-adapted model calibrated on the domain.", ""]
    key = key_numbers(result)
    if key:
        out += ["## Key numbers", ""] + [f"- {k}" for k in key] + [""]
    # summary table
    out += ["## Summary", ""]
    header = ["comparison", "pair"] + [f"IoU @{sp:g}" for sp in sparsities]
    sp_spear = sorted({r["sparsity"] for r in result["results"] if r["metric"] == "spearman"},
                      key=lambda x: -1 if x is None else x)
    header += ["Spearman" if sp is None else f"Spearman @{sp:g}" for sp in sp_spear]
    rows = []
    pairs = list(dict.fromkeys((r["comparison"], r["a"], r["b"]) for r in result["results"]))
    index = {(r["comparison"], r["a"], r["b"], r["metric"], r["sparsity"]): r for r in result["results"]}
    for comp, a, b in pairs:
        row = [comp, f"`{a}` vs `{b}`"]
        row += [_f(index.get((comp, a, b, "iou", sp), {}).get("overall")) for sp in sparsities]
        row += [_f(index.get((comp, a, b, "spearman", sp), {}).get("overall")) for sp in sp_spear]
        rows.append(row)
    out += [md_table(header, rows), ""]
    # per module type
    out += ["## Per module type", ""]
    for metric, sps in (("iou", sparsities), ("spearman", sp_spear)):
        for sp in sps:
            rs = _results(result, metric=metric, sparsity=sp)
            modules = list(dict.fromkeys(m for r in rs for m in r["by_module"]))
            if not modules:
                continue
            label = METRIC_LABEL[metric] + (f", sparsity {sp:g}" if sp is not None else "")
            out += [f"**{label}**", "",
                    md_table(["comparison", "pair"] + modules,
                             [[r["comparison"], _short_pair(r)] + [_f(r["by_module"].get(m)) for m in modules]
                              for r in rs]), ""]
    # per layer: compact table (first, middle, last layers) + curves
    out += ["## Per layer", ""]
    for title, name in figs.get("curves", []):
        out += [f"![{title}]({name})", ""]
    for sp in sparsities[:1] + sparsities[-1:] if len(sparsities) > 1 else sparsities:
        rs = _results(result, metric="iou", sparsity=sp)
        if not rs:
            continue
        layers = list(rs[0]["by_layer"])
        pick = list(dict.fromkeys([layers[0], layers[len(layers) // 4], layers[len(layers) // 2],
                                   layers[3 * len(layers) // 4], layers[-1]]))
        out += [f"IoU by layer at sparsity {sp:g} (selected layers; every layer in `shift_summary.csv`):", "",
                md_table(["comparison", "pair"] + [f"layer {k}" for k in pick],
                         [[r["comparison"], _short_pair(r)] + [_f(r["by_layer"].get(k)) for k in pick] for r in rs]),
                ""]
    out += ["## Heat maps (layer x module)", ""]
    for title, name in figs.get("heatmaps", []):
        out += [f"![{title}]({name})", ""]
    mv = result.get("movement") or {}
    if mv:
        out += ["## Mask movement between prune steps", "",
                "Share of the kept set of each matrix that changed since the previous prune step (from the run's "
                "`results.json` prune reports).", ""]
        rows = [[run, f"{s['step']}{' (final)' if s['final'] else ''}", _f(s["overall"], 4)]
                + [_f(s["by_module"].get(m), 4) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj")]
                for run, m in mv.items() for s in m["steps"]]
        if rows:
            out += [md_table(["run", "step", "all", "q", "k", "v", "o", "gate", "up", "down"], rows), ""]
        else:
            out += ["_The given runs have no prune step with movement (a run needs two or more prune steps)._", ""]
        for title, name in figs.get("movement", []):
            out += [f"![{title}]({name})", ""]
    ad = result.get("adaptation") or {}
    if ad:
        out += ["## Domain adaptation", "",
                md_table(["domain", "steps", "first loss", "final loss", "train time", "run"],
                         [[d, len(a["loss_history"]), _f(a["loss_history"][0][1] if a["loss_history"] else None),
                           _f(a.get("final_loss")), _f((a.get("timing") or {}).get("train_s"), 1) + " s",
                           f"`{a['run_dir']}`"] for d, a in ad.items()]), ""]
        for title, name in figs.get("adaptation", []):
            out += [f"![{title}]({name})", ""]
    timing = result.get("timing") or {}
    if timing:
        out += ["## Cost", "", md_table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in timing.items()]), ""]
    out += ["## Files", "", "- `shift.json`: settings and every number (per comparison: overall, by layer, by module, "
            "per matrix)", "- `shift_summary.csv`: overall / per-layer / per-module values (long format)",
            "- `shift_matrices.csv`: one value per matrix", ""]
    return "\n".join(out)


def write_shift_outputs(result: dict, out_dir: str | Path, command: str | None = None) -> Path:
    """Write every output of a shift result into ``out_dir``; returns the markdown page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command:
        result = dict(result, command=command)
    normalise(result)
    atomic_write_json(out_dir / "shift.json", result)
    write_csvs(result, out_dir)
    figs = write_figures(result, out_dir)
    page = atomic_write_text(out_dir / "shift.md", render_markdown(result, figs, result.get("command")))
    log.info("wrote %s", page)
    return Path(page)


def rewrite_from_json(out_dir: str | Path) -> Path:
    """Re-render the page and figures from a stored ``shift.json`` (no recomputation)."""
    out_dir = Path(out_dir)
    return write_shift_outputs(json.loads((out_dir / "shift.json").read_text()), out_dir)
