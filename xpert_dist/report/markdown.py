"""Markdown reports from stored results: one page per run, and one page comparing runs.

Nothing is recomputed: every number is read from ``<run_dir>/results.json`` (schema in ``results.py``);
retention is the ratio of stored metrics (``xpert_dist.eval.retention.retention``). A run report
also shows the references the run recorded (``reference`` in results.json: the base model's metrics
and a dense-LoRA run's, see ``eval/reference.py``) with retention against each. Files are written
atomically; images sit beside the markdown and are linked relatively.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..errors import ConfigError
from ..eval.retention import metric_kind, retention
from . import plots
from .results import atomic_write_text, fmt_value, get_path, layer_means, load_results, md_table, sparsity_grid

log = logging.getLogger(__name__)

SUMMARY_FIELDS = [("domain", "domain"), ("model", "model.name_or_path"), ("method", "prune.method"),
                  ("sparsity", "prune.sparsity"), ("pattern", "prune.pattern"), ("schedule", "prune.schedule"),
                  ("pbs", "prune.pbs"), ("lora r", "lora.r"), ("steps", "train.max_steps"),
                  ("seq len", "data.seq_len")]


def _mean_sparsity(sparsity: dict) -> float | None:
    _, _, grid = sparsity_grid(sparsity)
    vals = [v for row in grid for v in row if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _fmt_or_dash(key: str, value) -> str:
    return "-" if value is None else fmt_value(key, value)


def _model_name(cfg: dict) -> str | None:
    return "tiny random Llama" if get_path(cfg, "model.tiny") is not None else get_path(cfg, "model.name_or_path")


def _kv_table(values: dict) -> str:
    return md_table(["key", "value"], [[k, fmt_value(k, v)] for k, v in values.items()])


def _references(res: dict, reference: str | Path | None) -> dict:
    """``{"base": {...}, "dense_lora": {...}}`` from results.json's ``reference`` (written by the run,
    see ``eval/reference.py``); ``reference`` (a dense-LoRA run directory) replaces the stored one."""
    refs = dict(res.get("reference") or {})
    if reference is not None:
        ref = load_results(reference)
        refs["dense_lora"] = {"run": str(reference), "name": ref["name"], "metrics": ref["metrics"],
                              "method": get_path(ref["config"], "prune.method")}
    return refs


def reference_section(metrics: dict, refs: dict) -> list[str]:
    """Metrics of the run beside the base model's and the dense-LoRA run's, and retention against them."""
    rows_src = [("this run", metrics)]
    base, dense = refs.get("base"), refs.get("dense_lora")
    if base:
        rows_src.append(("base model (unpruned, not fine-tuned)", base.get("metrics") or {}))
    if dense:
        rows_src.append((f"dense LoRA `{dense.get('name')}`", dense.get("metrics") or {}))
    if len(rows_src) == 1:
        return ["_No reference: the base model was not evaluated (eval.base_reference=false) and no "
                "dense-LoRA run was given (eval.reference_run, or launchers/run.py --reference RUN_DIR)._", ""]
    keys = list(dict.fromkeys(k for _, m in rows_src for k in m if metric_kind(k)))
    out = [md_table(["model"] + keys, [[label] + [_fmt_or_dash(k, m.get(k)) for k in keys] for label, m in rows_src]),
           ""]
    ret_rows = []
    for label, ref in (("vs dense LoRA", dense), ("vs base model", base)):
        if ref:
            ret_rows.append((label, retention(metrics, ref.get("metrics") or {})))
    rkeys = list(dict.fromkeys(["domain_retention"] + [k for _, r in ret_rows for k in r]))
    out += ["Retention (`xpert_dist.eval.retention`): perplexity reference/run, accuracy run/reference; "
            "`domain_retention` averages perplexity and each task's `acc`.", "",
            md_table(["retention"] + rkeys, [[label] + [fmt_value(k, r[k]) if k in r else "-" for k in rkeys]
                                            for label, r in ret_rows]), ""]
    if base and base.get("cache"):
        out += [f"Base model metrics {'read from' if base.get('cached') else 'computed once and cached in'} "
                f"`{base['cache']}`.", ""]
    return out


def write_run_report(run_dir: str | Path, reference: str | Path | None = None) -> Path:
    """Write ``run_dir/report.md`` (+ ``loss.png``, ``sparsity.png`` when there is data); return its path.

    ``reference``: a dense-LoRA run directory to compare with (default: the one the run recorded)."""
    run_dir = Path(run_dir)
    res = load_results(run_dir)
    cfg = res["config"]
    out = [f"# Run `{res['name']}`", ""]
    summary = [[label, _model_name(cfg) if label == "model" else fmt_value(label, get_path(cfg, key))]
               for label, key in SUMMARY_FIELDS if get_path(cfg, key) is not None]
    if summary:
        out += [md_table(["setting", "value"], summary), ""]

    out += ["## Metrics", ""]
    out += [_kv_table(res["metrics"]) if res["metrics"] else "_No metrics recorded._", ""]
    out += ["## Against the references", ""] + reference_section(res["metrics"], _references(res, reference))

    out += ["## Training loss", ""]
    history = res["loss_history"]
    loss_png = plots.plot_loss({res["name"]: history}, run_dir / "loss.png", {res["name"]: res["prune_steps"]},
                               title=f"Training loss: {res['name']}")
    if loss_png:
        first, last = history[0], history[-1]
        smooth = plots.ema([v for _, v in history], plots.ema_span(len(history)))
        out += [f"![training loss](loss.png)", "",
                f"{len(history)} points, loss {first[1]:.4g} at step {first[0]:g} -> {last[1]:.4g} at step "
                f"{last[0]:g}. Prune steps: {', '.join(f'{s:g}' for s in res['prune_steps']) or 'none'}.",
                f"Smoothed (EMA, span {plots.ema_span(len(history))} steps, the bold line): "
                f"{smooth[0]:.4g} -> {smooth[-1]:.4g}; dotted vertical lines: prune steps.", ""]
    else:
        out += ["_No loss history recorded._", ""]

    out += ["## Sparsity", ""]
    sp_png = plots.plot_sparsity(res["sparsity"], run_dir / "sparsity.png", title=f"Sparsity: {res['name']}")
    if sp_png:
        _, _, grid = sparsity_grid(res["sparsity"])
        vals = [v for row in grid for v in row if not math.isnan(v)]
        out += ["![per-layer sparsity](sparsity.png)", "",
                f"{len(vals)} modules in {len(grid)} layers; mean over modules {sum(vals) / len(vals):.4f} "
                f"(unweighted), min {min(vals):.4f}, max {max(vals):.4f}.", ""]
    else:
        out += ["_No per-layer sparsity recorded._", ""]

    for section in ("timing", "memory"):
        out += [f"## {section.capitalize()}", ""]
        out += [_kv_table(res[section]) if res[section] else f"_No {section} recorded._", ""]

    if cfg:
        out += ["## Configuration", "", "<details><summary>full config</summary>", "", "```json",
                json.dumps(cfg, indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]
    path = atomic_write_text(run_dir / "report.md", "\n".join(out))
    log.info("wrote %s", path)
    return path


def _pick_reference(runs: list[dict], reference: str | None) -> dict | None:
    names = [r["name"] for r in runs]
    if reference is not None:
        for r in runs:
            if r["name"] == reference:
                return r
        raise ConfigError(f"comparison reference run {reference!r} is not among the runs: {', '.join(names)}")
    dense = [r for r in runs if get_path(r["config"], "prune.method") == "none"]
    return dense[0] if len(dense) == 1 else None


def _links(run_dir: Path, out_dir: Path) -> str:
    files = [run_dir / "results.json"] + sorted(run_dir.glob("*manifest*.json"))
    if (run_dir / "report.md").is_file():
        files.append(run_dir / "report.md")
    return ", ".join(f"[{f.name}]({Path(os.path.relpath(f, out_dir)).as_posix()})" for f in files)


def write_comparison_report(run_dirs: list[str | Path], out_dir: str | Path, reference: str | None = None
                            ) -> Path:
    """Write ``out_dir/comparison.md`` (+ ``compare_*.png``) comparing the runs; return its path.

    ``reference`` names the dense-LoRA run that retention is measured against; None: the single run
    whose ``prune.method`` is ``none``, else no retention section.
    """
    if not run_dirs:
        raise ConfigError("write_comparison_report needs at least one run directory")
    out_dir = Path(out_dir)
    dirs = [Path(d) for d in run_dirs]
    runs = [load_results(d) for d in dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"runs to compare have duplicate names: {names}")
    ref = _pick_reference(runs, reference)
    out = [f"# Comparison of {len(runs)} runs", ""]

    summary = []
    for r in runs:
        c = r["config"]
        summary.append([r["name"], get_path(c, "prune.method", "?"),
                        _fmt_or_dash("sparsity", get_path(c, "prune.sparsity")),
                        _fmt_or_dash("sparsity", _mean_sparsity(r["sparsity"])), get_path(c, "prune.schedule", "?")])
    out += [md_table(["run", "method", "target sparsity", "measured (mean)", "schedule"], summary), ""]

    retained: dict[str, dict[str, float]] = {}
    if ref is not None:
        out += ["## Retention", "", f"Against the dense reference `{ref['name']}`: perplexity dense/run, "
                "accuracy run/dense; `domain_retention` averages perplexity and each task's `acc`.", ""]
        retained = {r["name"]: retention(r["metrics"], ref["metrics"]) for r in runs}
        keys = list(dict.fromkeys(["domain_retention"] + [k for v in retained.values() for k in v]))
        out += [md_table(["run"] + keys, [[n] + [fmt_value(k, v[k]) if k in v else "-" for k in keys]
                                          for n, v in retained.items()]), ""]
        if plots.plot_retention(retained, out_dir / "compare_retention.png"):
            out += ["![retention](compare_retention.png)", ""]
    else:
        out += ["_No dense reference run (pass `reference=`), so no retention._", ""]

    out += ["## Metrics", ""]
    metric_keys = list(dict.fromkeys(k for r in runs for k, v in r["metrics"].items() if metric_kind(k)))
    if metric_keys:
        rows = [[r["name"]] + [_fmt_or_dash(k, r["metrics"].get(k)) for k in metric_keys] for r in runs]
        out += [md_table(["run"] + metric_keys, rows), ""]
        panels = {r["name"]: {k: float(r["metrics"][k]) for k in metric_keys if k in r["metrics"]} for r in runs}
        if plots.plot_metric_panels(panels, out_dir / "compare_metrics.png"):
            out += ["![metrics](compare_metrics.png)", ""]
    else:
        out += ["_No metrics recorded._", ""]

    out += ["## Training loss", ""]
    if plots.plot_loss({r["name"]: r["loss_history"] for r in runs}, out_dir / "compare_loss.png",
                       {r["name"]: r["prune_steps"] for r in runs}, title="Training loss"):
        out += ["![loss curves](compare_loss.png)", ""]
    else:
        out += ["_No loss history recorded._", ""]

    out += ["## Per-layer sparsity", ""]
    if plots.plot_sparsity_profiles({r["name"]: r["sparsity"] for r in runs}, out_dir / "compare_sparsity.png"):
        out += ["![mean sparsity per layer](compare_sparsity.png)", ""]
        rows = []
        for r in runs:
            layers, means = layer_means(r["sparsity"])
            if layers:
                rows.append([r["name"], f"{min(means):.3f}", f"{max(means):.3f}",
                             f"{layers[means.index(max(means))]}"])
        out += [md_table(["run", "min layer mean", "max layer mean", "most pruned layer"], rows), ""]
    else:
        out += ["_No per-layer sparsity recorded._", ""]

    out += ["## Time and peak memory", ""]
    cost_keys = list(dict.fromkeys([f"timing.{k}" for r in runs for k in r["timing"]]
                                   + [f"memory.{k}" for r in runs for k in r["memory"]]))
    if cost_keys:
        rows = [[r["name"]] + [_fmt_or_dash(k, get_path(r, k)) for k in cost_keys] for r in runs]
        out += [md_table(["run"] + cost_keys, rows), ""]
    else:
        out += ["_No timing or memory recorded._", ""]

    out += ["## Runs", ""]
    out += [f"- `{r['name']}`: {_links(d, out_dir)}" for r, d in zip(runs, dirs)] + [""]
    path = atomic_write_text(out_dir / "comparison.md", "\n".join(out))
    log.info("wrote %s", path)
    return path
