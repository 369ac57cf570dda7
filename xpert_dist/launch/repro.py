"""Compare finished runs (``manifest.json`` of each): masks must be bit-identical.

Across world sizes and reruns the pruning masks must not change (deterministic reductions and
tie-breaking, see docs/ARCHITECTURE.md): `compare_runs` checks ``mask_sha256`` per matrix and
lists every matrix that differs or is missing. Final losses and metrics may differ by floating
point reduction order; they are tabulated with their differences to the first run, and only
fail the comparison when a tolerance is given.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_MASKS_DIFFER, EXIT_TOLERANCE, EXIT_UNREADABLE = 0, 1, 3, 2


@dataclass
class RunRecord:
    label: str
    path: Path
    manifest: dict

    @property
    def masks(self) -> dict[str, str]:
        return dict(self.manifest.get("mask_sha256") or {})

    @property
    def final_loss(self) -> float | None:
        v = self.manifest.get("final_loss")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def metrics(self) -> dict[str, float]:
        return flatten_numeric(self.manifest.get("metrics") or {})


@dataclass
class ReproReport:
    runs: list[RunRecord]
    mask_mismatches: dict[str, dict[str, str | None]] = field(default_factory=dict)
    loss_spread: float | None = None
    metric_spread: dict[str, float] = field(default_factory=dict)
    tolerance_failures: list[str] = field(default_factory=list)

    @property
    def masks_identical(self) -> bool:
        return not self.mask_mismatches

    @property
    def exit_code(self) -> int:
        if self.mask_mismatches:
            return EXIT_MASKS_DIFFER
        if self.tolerance_failures:
            return EXIT_TOLERANCE
        return EXIT_OK

    def markdown(self) -> str:
        return render_markdown(self)


class ManifestError(ValueError):
    """A run directory has no readable manifest.json."""


def flatten_numeric(tree: Any, prefix: str = "") -> dict[str, float]:
    """``{"ppl": {"health": 6.1}, "acc": 0.5}`` -> ``{"ppl.health": 6.1, "acc": 0.5}`` (numbers only)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten_numeric(v, f"{prefix}{k}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def load_run(path: str | Path, label: str | None = None) -> RunRecord:
    path = Path(path)
    man = path / "manifest.json" if path.is_dir() else path
    if not man.is_file():
        raise ManifestError(f"{path}: no manifest.json (run not finished?)")
    try:
        data = json.loads(man.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{man}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{man}: expected a JSON object")
    return RunRecord(label=label or (path.name if path.is_dir() else path.parent.name),
                     path=path, manifest=data)


def _unique_labels(paths: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
        return list(labels)
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def _close(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


def compare_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None, *,
                 loss_tol: float | None = None, metric_tol: float | None = None) -> ReproReport:
    """Load every run's manifest and compare against the first. Raises `ManifestError` when one is unreadable."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError("compare_runs needs at least two run directories")
    names = _unique_labels(paths, labels)
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    rep = ReproReport(runs=runs)

    matrices = sorted(set().union(*(r.masks for r in runs)))
    for m in matrices:
        hashes = {r.label: r.masks.get(m) for r in runs}
        if len(set(hashes.values())) > 1:
            rep.mask_mismatches[m] = hashes
    if not matrices:
        rep.mask_mismatches["<no masks>"] = {r.label: None for r in runs}

    ref = runs[0]
    losses = [r.final_loss for r in runs]
    if all(v is not None for v in losses):
        rep.loss_spread = max(losses) - min(losses)  # type: ignore[type-var]
        if loss_tol is not None and not all(_close(v, losses[0], loss_tol) for v in losses):  # type: ignore[arg-type]
            rep.tolerance_failures.append(f"final_loss spread {rep.loss_spread:.3g} > {loss_tol}")
    elif loss_tol is not None:
        rep.tolerance_failures.append("final_loss missing in "
                                      + ", ".join(r.label for r in runs if r.final_loss is None))
    keys = sorted(set().union(*(r.metrics for r in runs)))
    for k in keys:
        vals = [r.metrics.get(k) for r in runs]
        if all(v is not None for v in vals):
            rep.metric_spread[k] = max(vals) - min(vals)  # type: ignore[type-var]
            if metric_tol is not None and not all(_close(v, vals[0], metric_tol) for v in vals):  # type: ignore[arg-type]
                rep.tolerance_failures.append(f"metric {k} spread {rep.metric_spread[k]:.3g} > {metric_tol}")
    del ref
    return rep


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.6g}"


def _delta(v: float | None, ref: float | None) -> str:
    if v is None or ref is None:
        return "—"
    return f"{v - ref:+.3g}"


def render_markdown(rep: ReproReport) -> str:
    runs = rep.runs
    ref = runs[0]
    lines = ["# Reproducibility report", ""]
    lines += ["| run | directory | world size | matrices |", "|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.label} | `{r.path}` | {r.manifest.get('world_size', '?')} | {len(r.masks)} |")
    lines.append("")
    n = len(set().union(*(r.masks for r in runs)))
    if rep.masks_identical:
        lines.append(f"**Masks: identical** ({n} matrices, sha256 per matrix, {len(runs)} runs).")
    else:
        lines.append(f"**Masks: DIFFER** in {len(rep.mask_mismatches)} of {n} matrices:")
        lines.append("")
        lines.append("| matrix | " + " | ".join(r.label for r in runs) + " |")
        lines.append("|---|" + "---|" * len(runs))
        for m, hashes in rep.mask_mismatches.items():
            lines.append(f"| {m} | " + " | ".join((hashes[r.label] or "missing")[:12] for r in runs) + " |")
    lines += ["", "## Final loss", "", f"| run | final_loss | Δ vs {ref.label} |", "|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.label} | {_fmt(r.final_loss)} | {_delta(r.final_loss, ref.final_loss)} |")
    if rep.loss_spread is not None:
        lines.append(f"\nspread (max − min): {rep.loss_spread:.3g}")
    keys = sorted(set().union(*(r.metrics for r in runs)))
    if keys:
        lines += ["", "## Metrics", "",
                  "| metric | " + " | ".join(r.label for r in runs) + " | max |Δ| |",
                  "|---|" + "---|" * (len(runs) + 1)]
        for k in keys:
            vals = [r.metrics.get(k) for r in runs]
            lines.append(f"| {k} | " + " | ".join(_fmt(v) for v in vals)
                         + f" | {_fmt(rep.metric_spread.get(k))} |")
    if rep.tolerance_failures:
        lines += ["", "## Outside tolerance", ""] + [f"- {t}" for t in rep.tolerance_failures]
    lines.append("")
    return "\n".join(lines)
