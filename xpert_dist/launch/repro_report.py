"""The markdown form of a :class:`~xpert_dist.launch.repro.ReproReport`."""
from __future__ import annotations

from .repro import THRESHOLDS, ReproReport

MAX_MATRIX_ROWS = 20  # the JSON form lists every differing matrix


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.6g}"


def _delta(v: float | None, ref: float | None) -> str:
    return "—" if v is None or ref is None else f"{v - ref:+.3g}"


def render_markdown(rep: ReproReport) -> str:
    runs, ref = rep.runs, rep.runs[0]
    lines = ["# Reproducibility report", "", f"**Verdict: {rep.verdict}** (every run against `{ref.label}`)", "",
             "| run | world size | matrices | verdict | matrices differing | entries differing | fraction "
             "| IoU kept | max rel. Δloss | before 1st prune |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| {ref.label} | {ref.manifest.get('world_size', '?')} | {len(ref.masks)} | reference "
                 "| — | — | — | — | — | — |")
    for r, c in zip(runs[1:], rep.comparisons):
        t = c.total
        ent = "—" if t is None else f"{t.differing:,} of {t.entries:,}"
        frac = "—" if t is None else f"{t.fraction:.3g}"
        iou = "—" if t is None else f"{t.iou:.6f}"
        lines.append(f"| {r.label} | {r.manifest.get('world_size', '?')} | {len(r.masks)} | {c.verdict} "
                     f"| {len(c.hash_mismatches)} | {ent} | {frac} | {iou} | {_fmt(c.loss_rel_max)} "
                     f"| {_fmt(c.pre_prune_loss_rel)} |")
    lines += ["", "Thresholds for \"within float noise\" (see xpert_dist/launch/repro.py): "
              + ", ".join(f"{k} ≤ {v:g}" for k, v in THRESHOLDS.items()) + "."]
    if rep.masks_identical:
        lines += ["", f"**Masks: identical** ({len(ref.masks)} matrices, sha256 per matrix, {len(runs)} runs)."]
    else:
        lines += ["", f"**Masks: differ** in {len(rep.mask_mismatches)} of "
                  f"{len(set().union(*(r.masks for r in runs)))} matrices."]
    for r, c in zip(runs[1:], rep.comparisons):
        if c.reasons:
            lines += ["", f"`{r.label}` is different: " + "; ".join(c.reasons) + "."]
        if c.per_matrix:
            worst = sorted(c.per_matrix.items(), key=lambda kv: -kv[1].fraction)[:MAX_MATRIX_ROWS]
            lines += ["", f"Most differing matrices, `{r.label}` vs `{ref.label}`"
                      + (f" (top {MAX_MATRIX_ROWS} of {len(c.per_matrix)})" if len(c.per_matrix) > MAX_MATRIX_ROWS else "")
                      + ":", "", "| matrix | entries differing | fraction | IoU kept |", "|---|---|---|---|"]
            lines += [f"| {m} | {d.differing:,} of {d.entries:,} | {d.fraction:.3g} | {d.iou:.6f} |" for m, d in worst]
        elif c.hash_mismatches and c.total is None:
            lines += ["", f"`{r.label}`: sha256 differs in " + ", ".join(c.hash_mismatches[:MAX_MATRIX_ROWS])
                      + " (missing where a run has no such matrix; no masks.safetensors to count entries)"]
    lines += ["", "## Final loss", "", f"| run | final_loss | Δ vs {ref.label} |", "|---|---|---|"]
    lines += [f"| {r.label} | {_fmt(r.final_loss)} | {_delta(r.final_loss, ref.final_loss)} |" for r in runs]
    if rep.loss_spread is not None:
        lines.append(f"\nspread (max − min): {rep.loss_spread:.3g}")
    keys = sorted(set().union(*(r.metrics for r in runs)))
    if keys:
        lines += ["", "## Metrics", "", "| metric | " + " | ".join(r.label for r in runs) + " | max |Δ| |",
                  "|---|" + "---|" * (len(runs) + 1)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(r.metrics.get(k)) for r in runs)
                         + f" | {_fmt(rep.metric_spread.get(k))} |")
    if rep.tolerance_failures:
        lines += ["", "## Outside tolerance", ""] + [f"- {t}" for t in rep.tolerance_failures]
    lines.append("")
    return "\n".join(lines)
