"""One page comparing finished runs: ``xpert_dist.report.markdown.write_comparison_report`` (summary,
retention table and bars, per-metric panels, loss curves, per-layer sparsity, time and peak memory,
links to results/manifest/report), extended with what it lacks:

- **prune steps**: count, seconds per step, total prune time vs training time;
- **mask movement between prune steps** (from the runs' prune reports) as a table and one
  layer x module heat map per run (mean over steps);
- **mask overlap between runs** (pooled IoU of their ``masks.safetensors``, all and per module type);
- **artifacts**: links to each run's exported model, masks and manifest.

Nothing is recomputed except IoUs of stored masks; every figure is ``report.plots.PIXELS`` in size.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

from ..config import LLAMA_LINEARS
from ..errors import ConfigError
from ..report.markdown import write_comparison_report
from ..report.plots import FIG_INCHES
from ..report.results import atomic_write_text, load_results, md_table
from . import metrics as M
from .plots import heatmap_panels

log = logging.getLogger(__name__)


def _f(v, d=4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def prune_steps_section(runs: list[dict]) -> list[str]:
    rows = []
    for r in runs:
        reps = r.get("prune_reports") or []
        if not reps:
            continue
        secs = [float(x.get("seconds", 0.0)) for x in reps]
        t = r.get("timing") or {}
        rows.append([r["name"], len(reps), ", ".join(f"{s:.1f}" for s in secs), f"{sum(secs):.1f}",
                     _f(t.get("train_s"), 1), _f(t.get("prune_s"), 1)])
    if not rows:
        return []
    return ["## Prune steps", "", md_table(["run", "prune steps", "seconds per step", "sum (s)", "train_s", "prune_s"],
                                           rows), ""]


def movement_section(runs: list[dict], out_dir: Path) -> list[str]:
    rows, panels = [], {}
    for r in runs:
        steps = M.movement_from_reports(r.get("prune_reports") or [])
        if not steps:
            continue
        for s in steps:
            by_mod = M.aggregate(s["moved"], "module")
            rows.append([r["name"], f"{s['step']}{' (final)' if s['final'] else ''}",
                         _f(M.aggregate(s["moved"], "all").get("all"))] + [_f(by_mod.get(m)) for m in LLAMA_LINEARS])
        names = steps[0]["moved"].keys()
        panels[r["name"]] = {n: sum(s["moved"].get(n, 0.0) for s in steps) / len(steps) for n in names}
    if not rows:
        return []
    out = ["## Mask movement between prune steps", "",
           "Share of each matrix's kept set that changed since the previous prune step (`moved` in the prune "
           "reports); 0 = the mask is settled.", "",
           md_table(["run", "step", "all"] + [m.replace("_proj", "") for m in LLAMA_LINEARS], rows), ""]
    if heatmap_panels(panels, out_dir / "compare_movement.png", "Mask movement (mean over prune steps)",
                      label="moved share", vmin=0.0, cmap="magma", size=FIG_INCHES):
        out += ["![mask movement](compare_movement.png)", ""]
    return out


def overlap_section(dirs: list[Path], names: list[str]) -> list[str]:
    from ..train.export import load_masks

    have = [(n, d / "masks.safetensors") for n, d in zip(names, dirs) if (d / "masks.safetensors").is_file()]
    if len(have) < 2:
        return []
    rows = []
    for (na, pa), (nb, pb) in itertools.combinations(have, 2):
        fa, fb = load_masks(pa, packed=True), load_masks(pb, packed=True)
        counts = {}
        for k in sorted(set(fa) & set(fb)):
            a, b = fa[k], fb[k]  # unpacked one matrix at a time
            if a.shape == b.shape:
                counts[k] = M.overlap_counts(a, b)
        if not counts:
            continue
        by_mod = M.pooled_iou(counts, "module")
        rows.append([na, nb, len(counts), _f(M.pooled_iou(counts, "all").get("all"))]
                    + [_f(by_mod.get(m)) for m in LLAMA_LINEARS])
    if not rows:
        return []
    return ["## Mask overlap between runs", "",
            "Pooled IoU of the kept sets (Σ|a∧b| / Σ|a∨b| over the matrices both runs pruned).", "",
            md_table(["run a", "run b", "matrices", "IoU"] + [m.replace("_proj", "") for m in LLAMA_LINEARS], rows), ""]


def artifacts_section(dirs: list[Path], names: list[str], out_dir: Path) -> list[str]:
    rows = []
    for n, d in zip(names, dirs):
        links = []
        for label, p in (("model", d / "model"), ("masks", d / "masks.safetensors"), ("manifest", d / "manifest.json"),
                         ("report", d / "report.md")):
            if p.exists():
                links.append(f"[{label}]({_rel(p, out_dir)})")
        rows.append([f"`{n}`", ", ".join(links) or "-"])
    return ["## Artifacts", "", md_table(["run", "files"], rows), ""]


def write_comparison_page(run_dirs: list[str | Path], out_dir: str | Path, reference: str | None = None) -> Path:
    """``out_dir/comparison.md`` (+ PNGs): the report package's comparison plus the sections above."""
    if not run_dirs:
        raise ConfigError("compare needs at least one run directory")
    out_dir = Path(out_dir)
    dirs = [Path(d) for d in run_dirs]
    path = write_comparison_report(dirs, out_dir, reference=reference)
    runs = [load_results(d) for d in dirs]
    names = [r["name"] for r in runs]
    extra = prune_steps_section(runs) + movement_section(runs, out_dir) + overlap_section(dirs, names) \
        + artifacts_section(dirs, names, out_dir)
    if extra:
        text = Path(path).read_text().rstrip("\n") + "\n\n" + "\n".join(extra)
        atomic_write_text(path, text)
    log.info("wrote %s", path)
    return Path(path)
