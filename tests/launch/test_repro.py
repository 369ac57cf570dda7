"""Comparison of finished runs: mask agreement counted entry by entry, loss/metric spread, verdicts."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from xpert_dist.launch import repro
from xpert_dist.train.export import save_masks

from .conftest import REPO

SHAPES = {"model.layers.0.mlp.up_proj": (64, 32), "model.layers.0.self_attn.q_proj": (32, 32)}


def base_masks():
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(s, generator=g) > 0.5 for n, s in SHAPES.items()}


def sha(mask: torch.Tensor) -> str:  # the manifest's definition, independent of the exporter
    import numpy as np

    bits = np.packbits(mask.reshape(-1).numpy().astype(np.uint8))
    return hashlib.sha256(str(tuple(mask.shape)).encode() + bits.tobytes()).hexdigest()


def make_run(path, masks, losses, ppl, ws=1, write_masks=True):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({
        "mask_sha256": {n: sha(m) for n, m in masks.items()}, "final_loss": losses[-1], "world_size": ws,
        "metrics": {"perplexity": ppl, "tasks": {"pubmedqa": 0.5}}}))
    (path / "results.json").write_text(json.dumps({"loss_history": [[i + 1, v] for i, v in enumerate(losses)],
                                                   "prune_steps": [2]}))
    if write_masks:
        save_masks(masks, path / "masks.safetensors")
    return path


def flip(masks, name, idx):
    out = {k: v.clone() for k, v in masks.items()}
    flat = out[name].reshape(-1)
    flat[idx] = ~flat[idx]
    return out


LOSSES = [3.25, 3.20, 3.19444]


def test_identical_runs(tmp_path):
    m = base_masks()
    a, b = make_run(tmp_path / "1x1", m, LOSSES, 10.0), make_run(tmp_path / "1x2", m, LOSSES, 10.0, ws=2)
    rep = repro.compare_runs([a, b])
    assert rep.verdict == "identical" and rep.exit_code == 0 and rep.masks_identical
    c = rep.comparisons[0]
    assert c.total.entries == 64 * 32 + 32 * 32 and c.total.differing == 0 and c.losses_equal
    assert "**Verdict: identical**" in rep.markdown()


def test_float_noise_counts_entries_and_iou(tmp_path):
    m = base_masks()
    name = "model.layers.0.mlp.up_proj"
    # swap one kept and one pruned entry: 2 of 3072 entries differ, kept count unchanged
    flat = m[name].reshape(-1)
    kept_i, pruned_i = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
    other = flip(m, name, torch.tensor([kept_i, pruned_i]))
    noisy = [3.25 * (1 + 1e-7), 3.20 * (1 + 2e-6), 3.19396]  # apart after the prune step (before step 3)
    a = make_run(tmp_path / "a", m, LOSSES, 10.0)
    b = make_run(tmp_path / "b", other, noisy, 10.001, ws=2)
    rep = repro.compare_runs([a, b])
    c = rep.comparisons[0]
    total = 64 * 32 + 32 * 32
    kept = int(m[name].sum()) + int(m["model.layers.0.self_attn.q_proj"].sum())
    assert (c.total.entries, c.total.differing) == (total, 2)
    assert c.total.fraction == pytest.approx(2 / total)
    assert c.total.iou == pytest.approx((kept - 1) / (kept + 1))  # |K1 ∩ K2| = kept-1, |K1 ∪ K2| = kept+1
    assert set(c.per_matrix) == {name} and c.per_matrix[name].differing == 2
    assert c.first_loss_rel == pytest.approx(1e-7, rel=1e-3)
    assert c.pre_prune_loss_rel == pytest.approx(2e-6, rel=1e-3)  # steps 1-2, before the prune step
    assert c.loss_rel_max == pytest.approx((3.19444 - 3.19396) / 3.19444, rel=1e-6)
    assert c.verdict == "within float noise" and rep.exit_code == repro.EXIT_NOT_IDENTICAL
    assert repro.compare_runs([a, b], require="noise").exit_code == 0
    md = rep.markdown()
    assert "within float noise" in md and "2 of 3,072" in md and "| perplexity | 10 | 10.001 |" in md
    assert repro.compare_runs([a, b], require="noise", loss_tol=1e-9).exit_code == repro.EXIT_TOLERANCE
    # a real change of the masks: 2% of the entries (a sparsity 2 points higher would do it)
    flips = torch.randperm(64 * 32, generator=torch.Generator().manual_seed(2))[:62]
    c2 = repro.compare_runs([a, make_run(tmp_path / "c", flip(m, name, flips), noisy, 10.0)]).comparisons[0]
    assert c2.total.differing == 62 and c2.verdict == "different" and "mask fraction" in c2.reasons[0]


def test_loss_apart_from_step_one_is_different(tmp_path):
    m = base_masks()
    a = make_run(tmp_path / "a", m, LOSSES, 10.0)
    b = make_run(tmp_path / "b", m, [3.26, 3.21, 3.2], 10.0)  # other data: 3e-3 apart at step 1
    c = repro.compare_runs([a, b]).comparisons[0]
    assert c.verdict == "different" and any("before the first prune step" in r for r in c.reasons)


def test_differing_masks_without_files_are_named_and_fail(tmp_path):
    m = base_masks()
    other = {"model.layers.0.mlp.up_proj": ~m["model.layers.0.mlp.up_proj"]}
    a = make_run(tmp_path / "a", m, LOSSES, 10.0, write_masks=False)
    b = make_run(tmp_path / "b", other, [2.6], 10.0, write_masks=False)
    rep = repro.compare_runs([a, b])
    assert set(rep.mask_mismatches) == set(SHAPES) and rep.verdict == "different"
    assert rep.exit_code == repro.EXIT_DIFFERENT
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "repro.py"), str(a), str(b),
                           "--out", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "model.layers.0.mlp.up_proj" in proc.stderr and "Masks: differ" in proc.stdout
    assert "missing" in (tmp_path / "r.md").read_text()
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "different"


def test_missing_manifest(tmp_path):
    a = make_run(tmp_path / "a", base_masks(), LOSSES, 1.0)
    (tmp_path / "b").mkdir()
    with pytest.raises(repro.ManifestError, match="no manifest.json"):
        repro.compare_runs([a, tmp_path / "b"])
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "repro.py"), str(a), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2


def test_submit_repro_dry_run_plans_the_layouts(tmp_path):
    from .conftest import tiny_config, write_config

    cfg = write_config(tmp_path / "run.json", tiny_config(tmp_path / "out", train={"batch_size": 4}))
    cmd = [sys.executable, str(REPO / "launchers" / "submit.py"), "repro", "--config", str(cfg), "--dry-run",
           "--layouts", "1x1,1x2,2x1", "--repeats", "1", "train.reproducible=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "4 job(s), executor slurm" in proc.stdout
    for label, layout in (("1x1", "1 node(s) x 1 task(s)"), ("1x2", "1 node(s) x 2 task(s)"),
                          ("2x1", "2 node(s) x 1 task(s)"), ("1x1-rerun1", "1 node(s) x 1 task(s)")):
        assert f"{label}: {layout}" in proc.stdout, proc.stdout
    bad = subprocess.run(cmd[:-1] + ["--layouts", "1x3"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "cannot be split evenly over 3 ranks" in bad.stderr
