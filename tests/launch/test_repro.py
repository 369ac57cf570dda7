"""Comparison of finished runs' manifests."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xpert_dist.launch import repro

from .conftest import REPO


def make_run(path, masks, loss, ppl, ws=1):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"mask_sha256": masks, "final_loss": loss, "world_size": ws,
                                                    "metrics": {"perplexity": ppl, "tasks": {"pubmedqa": 0.5}}}))
    return path


MASKS = {"model.layers.0.mlp.up_proj": "aa" * 32, "model.layers.0.self_attn.q_proj": "bb" * 32}


def test_identical_masks_report_differences_in_numbers(tmp_path):
    a = make_run(tmp_path / "ws1", MASKS, 2.5, 10.0)
    b = make_run(tmp_path / "ws2", MASKS, 2.5000004, 10.001, ws=2)
    rep = repro.compare_runs([a, b])
    assert rep.masks_identical and rep.exit_code == 0
    md = rep.markdown()
    assert "Masks: identical" in md and "| perplexity | 10 | 10.001 |" in md and "tasks.pubmedqa" in md
    assert repro.compare_runs([a, b], loss_tol=1e-9).exit_code == repro.EXIT_TOLERANCE


def test_differing_masks_are_named_and_fail(tmp_path):
    a = make_run(tmp_path / "a", MASKS, 2.5, 10.0)
    other = dict(MASKS, **{"model.layers.0.mlp.up_proj": "cc" * 32})
    other.pop("model.layers.0.self_attn.q_proj")
    b = make_run(tmp_path / "b", other, 2.6, 10.0)
    rep = repro.compare_runs([a, b])
    assert set(rep.mask_mismatches) == {"model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"}
    assert rep.exit_code == repro.EXIT_MASKS_DIFFER
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "repro.py"), str(a), str(b),
                           "--out", str(tmp_path / "r.md")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "model.layers.0.mlp.up_proj" in proc.stderr and "Masks: DIFFER" in proc.stdout
    assert "missing" in (tmp_path / "r.md").read_text()


def test_missing_manifest(tmp_path):
    a = make_run(tmp_path / "a", MASKS, 1.0, 1.0)
    (tmp_path / "b").mkdir()
    with pytest.raises(repro.ManifestError, match="no manifest.json"):
        repro.compare_runs([a, tmp_path / "b"])
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "repro.py"), str(a), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
