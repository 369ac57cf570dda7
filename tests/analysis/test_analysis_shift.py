"""`analyze.py shift` and `transfer` end to end on a tiny random Llama with the shipped sample data."""
import csv
import json
import math
import os
import re

import pytest

from xpert_dist.analysis import shift as S
from xpert_dist.config import ModelConfig
from xpert_dist.data.sources import SAMPLE_DIR
from xpert_dist.errors import ConfigError

from analysis_helpers import png_size, write_run

TINY = "{num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2}"
COMMON = ["--tiny", TINY, "--sparsity", "0.5", "--calib-samples", "4", "--calib-seq-len", "16",
          "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def sample_data():
    old = os.environ.get("XPERT_DATA_DIR")
    os.environ["XPERT_DATA_DIR"] = str(SAMPLE_DIR)
    yield SAMPLE_DIR
    if old is None:
        os.environ.pop("XPERT_DATA_DIR", None)
    else:
        os.environ["XPERT_DATA_DIR"] = old


@pytest.fixture(scope="module")
def shift_dir(tmp_path_factory, sample_data, analyze):
    root = tmp_path_factory.mktemp("shift")
    run = write_run(root / "xpert_run", "xpert_run", "foresight", {"perplexity": 5.0}, 0.5, prune_steps=[2, 4])
    out = root / "out"
    argv = ["shift", *COMMON, "--domains", "general,health,legal", "--adapt-steps", "2", "--adapt-domains",
            "health,legal", "--adapt-batch-size", "2", "--adapt-seq-len", "16", "--out", str(out), "--runs", str(run)]
    assert analyze.main(argv) == 0
    return out, argv


def test_shift_outputs_render(shift_dir):
    out, _ = shift_dir
    text = (out / "shift.md").read_text()
    for section in ("## Summary", "## Per module type", "## Per layer", "## Heat maps", "## Mask movement",
                    "## Domain adaptation"):
        assert section in text, section
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert any(i.startswith("heat_iou_") for i in images) and any(i.startswith("layers_") for i in images)
    assert "movement_xpert_run.png" in images and "adaptation_loss.png" in images
    for name in images:
        w, h = png_size(out / name)
        assert w >= 400 and h >= 200, name
    assert "python launchers/analyze.py shift" in text  # the command is recorded


def test_shift_numbers(shift_dir):
    out, _ = shift_dir
    res = json.loads((out / "shift.json").read_text())
    comps = {(r["comparison"], r["a"], r["b"]) for r in res["results"]}
    assert ("domains@before", "before:general", "before:health") in comps
    assert ("domains@after", "after:health", "after:legal") in comps
    assert ("adaptation", "before:legal", "after:legal") in comps
    assert ("general@before vs after", "before:general", "after:health") in comps
    assert not any("after:general" in (a, b) for _, a, b in comps)  # general was not adapted
    n_matrices = 2 * 7
    for r in res["results"]:
        assert len(r["per_matrix"]) == n_matrices
        assert set(r["by_layer"]) == {"0", "1"} and len(r["by_module"]) == 7
        if r["metric"] == "iou":
            assert r["sparsity"] == 0.5
            assert 0.0 <= r["overall"] <= 1.0
            vals = list(r["per_matrix"].values())
            assert min(vals) <= r["overall"] <= max(vals)  # pooled IoU lies between the matrices' IoUs
        else:
            assert r["sparsity"] is None and -1.0 <= r["overall"] <= 1.0
    # masks of different domains differ, but far less than random ones would
    iou = {(r["a"], r["b"], r["sparsity"]): r["overall"] for r in res["results"] if r["metric"] == "iou"}
    assert S.M.random_iou(0.5) < iou[("before:general", "before:health", 0.5)] < 1.0
    assert res["random_iou"]["0.5"] == pytest.approx(1 / 3)
    mv = res["movement"]["xpert_run"]["steps"]
    assert [s["step"] for s in mv] == [1, 2] and 0 < mv[0]["overall"] < 1
    with open(out / "shift_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["scope"] for r in rows} == {"all", "layer", "module"}
    with open(out / "shift_matrices.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) >= len(res["results"]) * n_matrices


def test_shift_rerun_resumes_from_cache(shift_dir):
    out, _ = shift_dir
    cache = out / "cache"
    files = [cache / "adapt" / "health" / "results.json", cache / "stats" / "after__legal.pt",
             cache / "calib" / "general.pt", cache / "records.json"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    stored, analysis = S.load_shift(out)  # the settings stored in shift.json rebuild the same cache keys
    again = analysis.run()
    assert stamps == {p: p.stat().st_mtime_ns for p in files}
    assert [r["overall"] for r in again["results"]] == [r["overall"] for r in stored["results"]]
    # a changed setting recomputes what depends on it (the records), not the adaptation
    analysis.cfg.sparsities = [0.4]
    analysis.run()
    assert (cache / "records.json").stat().st_mtime_ns != stamps[cache / "records.json"]
    assert (cache / "adapt" / "health" / "results.json").stat().st_mtime_ns == stamps[files[0]]


def test_transfer_end_to_end(shift_dir, analyze, tmp_path):
    out, _ = shift_dir
    _, analysis = S.load_shift(out)
    health = next(d for d in analysis.cfg.domains if d.name == "health")
    # a "run" whose masks are health's own one-shot masks: its retention must equal after:self
    from xpert_dist.train.export import save_masks

    own = tmp_path / "own_run"
    own.mkdir()
    save_masks(S.compute_masks(analysis, "after", health, 0.5), own / "masks.safetensors")
    tr = tmp_path / "transfer"
    assert analyze.main(["transfer", "--shift-dir", str(out), "--targets", "health", "--sparsity", "0.5",
                         "--own-run", f"health={own}", "--tasks", "none", "--perplexity-windows", "2",
                         "--perplexity-seq-len", "16", "--no-progress", "--out", str(tr)]) == 0
    res = json.loads((tr / "transfer.json").read_text())
    rows = {r["source"]: r for r in res["rows"]}
    assert set(rows) == {"before:general", "after:legal", "after:health", f"run:{own}"}
    for r in rows.values():
        assert r["mean_sparsity"] >= 0.5 - 1e-6
        assert math.isfinite(r["retention"]["domain_retention"]) and r["retention"]["domain_retention"] > 0
    assert rows[f"run:{own}"]["metrics"] == rows["after:health"]["metrics"]
    assert rows["after:health"]["iou_vs_own_one_shot"] == 1.0
    assert rows["before:general"]["iou_vs_own_one_shot"] < 1.0
    text = (tr / "transfer.md").read_text()
    assert "## Retention" in text and "transfer_retention.png" in text
    assert png_size(tr / "transfer_retention.png") == (800, 500)


def test_sequential_masks_match_the_pruner(tmp_path, sample_data):
    """Sequential statistics: recomputed masks are checked against the Pruner's hashes (raises if not)."""
    tiny = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    kw = dict(domains=S.parse_domains("general,legal"), model=ModelConfig(tiny=tiny), sparsities=[0.4, 0.5],
              calib_samples=4, calib_seq_len=16, batch_size=2, adapt_steps=0, progress=False)
    seq = S.ShiftAnalysis(S.ShiftConfig(out_dir=str(tmp_path / "seq"), calibration="sequential", **kw))
    records = seq.compute_records()
    assert {r["sparsity"] for r in records} == {0.4, 0.5}  # spearman too: scores depend on the sparsity here
    assert all(seq.stats("before", d, 0.5)["mask_sha256"] for d in seq.cfg.domains)
    dense = S.ShiftAnalysis(S.ShiftConfig(out_dir=str(tmp_path / "dense"), calibration="dense", **kw)).compute_records()
    assert {r["sparsity"] for r in dense if r["metric"] == "iou"} == {0.4, 0.5}
    assert {r["sparsity"] for r in dense if r["metric"] == "spearman"} == {None}
    # block 0 sees the same inputs in both modes, so its masks agree exactly; later blocks may not
    first = lambda recs: {(r["name"], r["metric"]): r["value"] for r in recs if r["layer"] == 0 and r["metric"] == "iou"}
    assert first(records) == first(dense)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="two domains"):
        S.parse_domains("health")
    with pytest.raises(ConfigError, match="unique"):
        S.parse_domains("a=health,a=legal")
    doms = S.parse_domains("general,med=data/med.jsonl")
    assert doms[1] == S.Domain("med", "data/med.jsonl")
    with pytest.raises(ConfigError, match="scored method"):
        S.ShiftAnalysis(S.ShiftConfig(out_dir=str(tmp_path), domains=doms, method="sparsegpt"))
    with pytest.raises(ConfigError, match="adapt_domains"):
        S.ShiftAnalysis(S.ShiftConfig(out_dir=str(tmp_path), domains=doms, adapt_domains=["legal"]))


def test_report_orders_layers_numerically_after_a_json_round_trip():
    from xpert_dist.analysis.shift_report import normalise

    res = {"results": [{"by_layer": {"0": 0.9, "1": 0.8, "10": 0.5, "2": 0.7},
                        "by_module": {"down_proj": 1, "k_proj": 2, "q_proj": 3, "up_proj": 4}}]}
    r = normalise(res)["results"][0]
    assert list(r["by_layer"]) == ["0", "1", "2", "10"]
    assert list(r["by_module"]) == ["q_proj", "k_proj", "up_proj", "down_proj"]
