"""Compare finished runs: how far apart are their masks, losses and metrics, and is that float noise?

``compare_runs(paths)`` reads each run's ``manifest.json`` (mask hashes, final loss, metrics), its
``results.json`` (the loss of every step) and its ``masks.safetensors``, and compares every run with
the first one:

* **masks**: per matrix and in total, the number and fraction of entries whose kept/pruned state
  differs and the IoU of the kept sets (``|K₁ ∩ K₂| / |K₁ ∪ K₂|``); without mask files only the
  sha256 per matrix can be compared;
* **losses**: the largest relative difference over the common steps, over the steps before the
  first prune step (``results.json``'s ``prune_steps``), at the first step and at the final step;
* **metrics**: the relative spread of each numeric metric.

The verdict is ``identical`` (every mask hash, every step's loss and every metric bit-equal),
``within float noise`` (every threshold below holds) or ``different``. What separates float noise
from a real change is the loss *before the first mask decision*: the same data and weights in
another reduction order agree there to ~1e-7 (measured: tiny Llama 1 vs 2 ranks 1.7e-7, SmolLM2
1 process vs 2 ranks 0 at step 1 and 2e-7 at step 2, issue 13 ~1e-7), while other rows give
other losses (SmolLM2's steps 1 and 2 of one run, on different rows: 3.359 vs 2.941, 12% apart).
A prune step then turns that noise into mask flips near the threshold, and the flips change the
later losses: measured SmolLM2 (4 steps, prune after step
2, 4 calibration windows, bench/results/repro_cost.md) 162,298 of 106M entries (1.5e-3, IoU
0.9975), later losses 7e-4 and perplexity 1.7% apart; issue 13 (128 calibration windows) 4,384
entries (4.1e-5) and 1.5e-4. The thresholds after the first prune step bound that amplification
with margin (mask fraction 1e-2, loss 1e-2, metrics 5e-2); a change of sparsity or method moves
a far larger share of the masks (0.1 of the entries per 10 points of sparsity).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

EXIT_OK, EXIT_DIFFERENT, EXIT_UNREADABLE, EXIT_TOLERANCE, EXIT_NOT_IDENTICAL = 0, 1, 2, 3, 4
EXIT_MASKS_DIFFER = EXIT_DIFFERENT  # the name before verdicts (masks differing meant failure)

VERDICTS = ("identical", "within float noise", "different")
PRE_PRUNE_LOSS_REL_NOISE = 1e-5  # |Δloss| / loss at every step before the first prune step
MASK_FRACTION_NOISE = 1e-2  # differing mask entries / all entries
LOSS_REL_NOISE = 1e-2  # |Δloss| / loss at any step
METRIC_REL_NOISE = 5e-2  # |Δmetric| / |metric|
THRESHOLDS = {"pre_prune_loss_rel": PRE_PRUNE_LOSS_REL_NOISE, "mask_fraction": MASK_FRACTION_NOISE,
              "loss_rel": LOSS_REL_NOISE, "metric_rel": METRIC_REL_NOISE}


def read_masks(path: Path) -> dict[str, torch.Tensor] | None:
    """``{name: bool tensor}`` from a run's masks file, None when there is none. The one place that
    knows the file format (the exporter's ``load_masks`` reads bit-packed and older files)."""
    if not path.is_file():
        return None
    from ..train.export import load_masks

    return load_masks(path)


class ManifestError(ValueError):
    """A run directory has no readable manifest.json."""


@dataclass
class RunRecord:
    label: str
    path: Path
    manifest: dict
    results: dict = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, str]:
        return dict(self.manifest.get("mask_sha256") or {})

    @property
    def final_loss(self) -> float | None:
        v = self.manifest.get("final_loss")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def losses(self) -> dict[int, float]:
        """Loss of every optimizer step (``results.json``'s loss_history), ``{step: loss}``."""
        return {int(s): float(v) for s, v in self.results.get("loss_history") or []}

    @property
    def metrics(self) -> dict[str, float]:
        return flatten_numeric(self.manifest.get("metrics") or {})

    @property
    def first_prune_step(self) -> int | None:
        """Optimizer steps done before the first prune step (None: no prune step recorded)."""
        steps = self.results.get("prune_steps")
        return min(steps) if steps else None

    def mask_tensors(self) -> dict[str, torch.Tensor] | None:
        return read_masks(self.path / "masks.safetensors") if self.path.is_dir() else None


@dataclass
class MaskDiff:
    """One matrix (or the total) of a run against the reference run."""

    entries: int
    differing: int
    kept_ref: int
    kept: int
    intersection: int

    @property
    def fraction(self) -> float:
        return self.differing / self.entries if self.entries else 0.0

    @property
    def iou(self) -> float:
        union = self.kept_ref + self.kept - self.intersection
        return self.intersection / union if union else 1.0

    def to_dict(self) -> dict:
        return {"entries": self.entries, "differing": self.differing, "fraction": self.fraction, "iou": self.iou}


def mask_diff(ref: torch.Tensor, other: torch.Tensor) -> MaskDiff:
    if ref.shape != other.shape:
        raise ValueError(f"mask shapes differ: {tuple(ref.shape)} vs {tuple(other.shape)}")
    a, b = ref.bool(), other.bool()
    return MaskDiff(a.numel(), int((a ^ b).sum()), int(a.sum()), int(b.sum()), int((a & b).sum()))


@dataclass
class Comparison:
    """One run against the reference (the first run)."""

    label: str
    hash_mismatches: list[str] = field(default_factory=list)  # matrices whose sha256 differs or is missing
    per_matrix: dict[str, MaskDiff] = field(default_factory=dict)  # only matrices that differ
    total: MaskDiff | None = None  # None: no mask files to count entries
    loss_rel_max: float | None = None
    first_loss_rel: float | None = None
    pre_prune_loss_rel: float | None = None  # over the steps before the first prune step
    final_loss_diff: float | None = None
    losses_equal: bool = False
    metric_rel: dict[str, float] = field(default_factory=dict)
    metrics_equal: bool = True
    verdict: str = "different"
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"label": self.label, "verdict": self.verdict, "reasons": self.reasons,
                "matrices_differing": len(self.hash_mismatches),
                "mask_total": self.total.to_dict() if self.total else None,
                "mask_per_matrix": {k: v.to_dict() for k, v in self.per_matrix.items()},
                "losses_bit_equal": self.losses_equal, "loss_rel_max": self.loss_rel_max,
                "first_loss_rel": self.first_loss_rel,
                "pre_prune_loss_rel": self.pre_prune_loss_rel, "final_loss_diff": self.final_loss_diff,
                "metrics_bit_equal": self.metrics_equal, "metric_rel": self.metric_rel}


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def compare_pair(ref: RunRecord, run: RunRecord, ref_masks: dict | None) -> Comparison:
    c = Comparison(run.label)
    names = sorted(set(ref.masks) | set(run.masks))
    c.hash_mismatches = [m for m in names if ref.masks.get(m) != run.masks.get(m)]
    if not names:
        c.hash_mismatches = ["<no masks>"]
    masks = run.mask_tensors() if c.hash_mismatches and ref_masks is not None else None
    if not c.hash_mismatches:  # identical hashes: nothing to count, the total is exact
        n = sum(int(t.numel()) for t in ref_masks.values()) if ref_masks else 0
        c.total = MaskDiff(n, 0, 0, 0, 0) if ref_masks else None
    elif masks is not None and set(masks) == set(ref_masks):
        total = MaskDiff(0, 0, 0, 0, 0)
        for m in sorted(ref_masks):
            d = mask_diff(ref_masks[m], masks[m])
            for k in ("entries", "differing", "kept_ref", "kept", "intersection"):
                setattr(total, k, getattr(total, k) + getattr(d, k))
            if d.differing:
                c.per_matrix[m] = d
        c.total = total
    la, lb = ref.losses, run.losses
    common = sorted(set(la) & set(lb))
    equal = []
    if common:
        rels = [_rel(la[s], lb[s]) for s in common]
        c.loss_rel_max, c.first_loss_rel = max(rels), rels[0]
        first = ref.first_prune_step
        pre = [r for s, r in zip(common, rels) if first is None or s <= first]
        c.pre_prune_loss_rel = max(pre) if pre else rels[0]  # a prune before training: the first step
        equal.append(la == lb)
    if ref.final_loss is not None and run.final_loss is not None:
        c.final_loss_diff = run.final_loss - ref.final_loss
        equal.append(ref.final_loss == run.final_loss)
    c.losses_equal = bool(equal) and all(equal)
    ma, mb = ref.metrics, run.metrics
    for k in sorted(set(ma) | set(mb)):
        c.metric_rel[k] = _rel(ma[k], mb[k]) if k in ma and k in mb else math.inf
    c.metrics_equal = ma == mb
    c.verdict, c.reasons = _verdict(c)
    return c


def _verdict(c: Comparison) -> tuple[str, list[str]]:
    if not c.hash_mismatches and c.losses_equal and c.metrics_equal:
        return "identical", []
    reasons = []
    if c.hash_mismatches:
        if c.total is None:
            reasons.append(f"masks differ in {len(c.hash_mismatches)} matrices and no mask files to count entries")
        elif c.total.fraction > MASK_FRACTION_NOISE:
            reasons.append(f"mask fraction differing {c.total.fraction:.3g} > {MASK_FRACTION_NOISE:g}")
    if c.first_loss_rel is None:
        reasons.append("no per-step losses to compare (results.json)")
    else:
        if c.pre_prune_loss_rel > PRE_PRUNE_LOSS_REL_NOISE:
            reasons.append(f"loss before the first prune step {c.pre_prune_loss_rel:.3g} relative apart "
                           f"> {PRE_PRUNE_LOSS_REL_NOISE:g}")
        if c.loss_rel_max > LOSS_REL_NOISE:
            reasons.append(f"loss relative difference {c.loss_rel_max:.3g} > {LOSS_REL_NOISE:g}")
    bad = {k: v for k, v in c.metric_rel.items() if v > METRIC_REL_NOISE}
    if bad:
        reasons.append("metrics apart: " + ", ".join(f"{k} {v:.3g}" for k, v in bad.items()))
    return ("different" if reasons else "within float noise"), reasons


@dataclass
class ReproReport:
    runs: list[RunRecord]
    comparisons: list[Comparison] = field(default_factory=list)
    loss_spread: float | None = None
    metric_spread: dict[str, float] = field(default_factory=dict)
    tolerance_failures: list[str] = field(default_factory=list)
    require: str = "identical"

    @property
    def mask_mismatches(self) -> dict[str, dict[str, str | None]]:
        names = sorted({m for c in self.comparisons for m in c.hash_mismatches})
        return {m: {r.label: r.masks.get(m) for r in self.runs} for m in names}

    @property
    def masks_identical(self) -> bool:
        return not self.mask_mismatches

    @property
    def verdict(self) -> str:
        """The worst verdict over all runs against the first."""
        return max((c.verdict for c in self.comparisons), key=VERDICTS.index, default="identical")

    @property
    def exit_code(self) -> int:
        if self.verdict == "different":
            return EXIT_DIFFERENT
        if self.tolerance_failures:
            return EXIT_TOLERANCE
        if self.require == "identical" and self.verdict != "identical":
            return EXIT_NOT_IDENTICAL
        return EXIT_OK

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "thresholds": THRESHOLDS,
                "runs": [{"label": r.label, "path": str(r.path), "world_size": r.manifest.get("world_size"),
                          "final_loss": r.final_loss, "mask_sha256_of_hashes": mask_fingerprint(r.masks),
                          "losses": [[s, v] for s, v in sorted(r.losses.items())], "metrics": r.metrics}
                         for r in self.runs],
                "comparisons": [c.to_dict() for c in self.comparisons], "loss_spread": self.loss_spread,
                "metric_spread": self.metric_spread, "tolerance_failures": self.tolerance_failures}

    def markdown(self) -> str:
        from .repro_report import render_markdown

        return render_markdown(self)


def mask_fingerprint(masks: dict[str, str]) -> str | None:
    """One sha256 over a run's sorted per-matrix mask hashes (a short fingerprint of all its masks)."""
    import hashlib

    if not masks:
        return None
    return hashlib.sha256(json.dumps(sorted(masks.items())).encode()).hexdigest()


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
    results = {}
    res = man.parent / "results.json"
    if res.is_file():
        try:
            results = json.loads(res.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{res}: not valid JSON: {e}") from e
    return RunRecord(label=label or (path.name if path.is_dir() else path.parent.name),
                     path=man.parent, manifest=data, results=results if isinstance(results, dict) else {})


def _unique_labels(paths: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
        return list(labels)
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def compare_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None, *,
                 loss_tol: float | None = None, metric_tol: float | None = None,
                 require: str = "identical") -> ReproReport:
    """Compare every run with the first. Raises `ManifestError` when a manifest is unreadable."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError("compare_runs needs at least two run directories")
    if require not in ("identical", "noise"):
        raise ValueError(f"require={require!r} is not 'identical' or 'noise'")
    runs = [load_run(p, n) for p, n in zip(paths, _unique_labels(paths, labels))]
    rep = ReproReport(runs=runs, require=require)
    ref_masks = runs[0].mask_tensors()
    rep.comparisons = [compare_pair(runs[0], r, ref_masks) for r in runs[1:]]

    losses = [r.final_loss for r in runs]
    if all(v is not None for v in losses):
        rep.loss_spread = max(losses) - min(losses)  # type: ignore[type-var]
        if loss_tol is not None and rep.loss_spread > loss_tol:
            rep.tolerance_failures.append(f"final_loss spread {rep.loss_spread:.3g} > {loss_tol}")
    elif loss_tol is not None:
        rep.tolerance_failures.append("final_loss missing in " + ", ".join(r.label for r in runs if r.final_loss is None))
    for k in sorted(set().union(*(r.metrics for r in runs))):
        vals = [r.metrics.get(k) for r in runs]
        if all(v is not None for v in vals):
            rep.metric_spread[k] = max(vals) - min(vals)  # type: ignore[type-var]
            if metric_tol is not None and rep.metric_spread[k] > metric_tol:
                rep.tolerance_failures.append(f"metric {k} spread {rep.metric_spread[k]:.3g} > {metric_tol}")
    return rep
