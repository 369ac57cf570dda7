"""Reports render from stored results.json files of two fake tiny runs (fixtures/), PNGs are valid."""
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from xpert_dist.errors import ConfigError
from xpert_dist.report import plots
from xpert_dist.report.markdown import write_comparison_report, write_run_report
from xpert_dist.report.results import fmt_value, load_results, parse_module, sparsity_grid

FIXTURES = Path(__file__).parent / "fixtures"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs(tmp_path):
    out = {}
    for name in ("tiny_dense", "tiny_wanda"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
        out[name] = tmp_path / name
    return out


def assert_png(path: Path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.load()  # decodes the whole image: a truncated file fails here
        assert im.size == plots.PIXELS == (800, 500)


def no_temp_files(folder: Path):
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_run_report(runs):
    run = runs["tiny_wanda"]
    path = write_run_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    assert text.startswith("# Run `tiny_wanda`")
    assert "| method | wanda |" in text and "| perplexity | 50 |" in text and "| pubmedqa_acc | 0.375 |" in text
    assert "12 points, loss 5.6 at step 1 -> 4.3 at step 12. Prune steps: 4, 8." in text
    # 14 modules: 10 at 0.5, 2 at 0.4, 2 at 0.6 -> mean 0.5
    assert "14 modules in 2 layers; mean over modules 0.5000 (unweighted), min 0.4000, max 0.6000" in text
    assert "| peak_rss_mb | 1.50 GiB |" in text and "| peak_gpu_bytes | 3.00 GiB |" in text
    assert "| total_s | 6.3 s |" in text
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert_png(run / img)
    assert {"loss.png", "sparsity.png"} <= {p.name for p in run.iterdir()}
    assert no_temp_files(run)


def test_run_report_without_curves_or_sparsity(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text(json.dumps({"name": "bare", "metrics": {"perplexity": 3.5}}))
    text = write_run_report(bare).read_text()
    assert "_No loss history recorded._" in text and "_No per-layer sparsity recorded._" in text
    assert not list(bare.glob("*.png"))
    dense_text = write_run_report(runs["tiny_dense"]).read_text()
    assert "Prune steps: none." in dense_text and "_No per-layer sparsity recorded._" in dense_text


def test_comparison_report(runs, tmp_path):
    out = tmp_path / "cmp"
    path = write_comparison_report([runs["tiny_dense"], runs["tiny_wanda"]], out)
    text = path.read_text()
    assert path == out / "comparison.md"
    assert "Against the dense reference `tiny_dense`" in text  # found by prune.method == none
    # hand-computed retention: ppl 40/50, acc .375/.5, acc_norm .5/.4, domain (0.8 + 0.75) / 2
    header = "| run | domain_retention | perplexity | pubmedqa_acc | pubmedqa_acc_norm |"
    assert header in text
    assert "| tiny_wanda | 0.775 | 0.8 | 0.75 | 1.25 |" in text
    assert "| tiny_dense | 1 | 1 | 1 | 1 |" in text
    assert "| tiny_wanda | wanda | 0.5 | 0.5 | steps |" in text
    assert "| tiny_wanda | 0.457 | 0.543 | 1 |" in text  # layer means (4*.5 + 3*.4)/7, (4*.5 + 3*.6)/7
    assert "| tiny_wanda | 1.1 s | 6.3 s | 3.4 s | 1.50 GiB | 3.00 GiB |" in text
    assert "| tiny_dense | none | 0 | - | steps |" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(images) == ["compare_loss.png", "compare_metrics.png", "compare_retention.png",
                              "compare_sparsity.png"]
    for img in images:
        assert_png(out / img)
    links = re.findall(r"\]\(([^)]+\.(?:json|md))\)", text)
    assert "../tiny_wanda/manifest.json" in links and "../tiny_dense/results.json" in links
    for link in links:
        assert (out / link).resolve().is_file()
    assert no_temp_files(out)


def test_comparison_reference_choice(runs, tmp_path):
    text = write_comparison_report(list(runs.values()), tmp_path / "c1", reference="tiny_wanda").read_text()
    assert "| tiny_dense | 1.292 | 1.25 | 1.333 | 0.8 |" in text  # dense vs wanda: (50/40 + .5/.375) / 2
    with pytest.raises(ConfigError, match="reference run 'nope' is not among the runs: tiny_dense, tiny_wanda"):
        write_comparison_report(list(runs.values()), tmp_path / "c2", reference="nope")
    text = write_comparison_report([runs["tiny_wanda"]], tmp_path / "c3").read_text()
    assert "no retention" in text and "compare_retention.png" not in text


def test_results_errors(tmp_path):
    with pytest.raises(ConfigError, match="results.json does not exist"):
        write_run_report(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ConfigError, match="string 'name'"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"name": "x", "loss_history": [[1, 2, 3]]}))
    with pytest.raises(ConfigError, match="loss_history"):
        load_results(tmp_path)
    with pytest.raises(ConfigError, match="at least one run"):
        write_comparison_report([], tmp_path)


def test_helpers():
    assert parse_module("model.layers.11.mlp.down_proj") == (11, "down_proj")
    assert parse_module("base_model.model.model.layers.2.self_attn.q_proj.weight") == (2, "q_proj")
    assert parse_module("lm_head") is None
    layers, modules, grid = sparsity_grid({"model.layers.1.mlp.up_proj": 0.3,
                                           "model.layers.0.self_attn.q_proj": 0.1})
    assert layers == [0, 1] and modules == ["q_proj", "up_proj"]
    assert grid[0][0] == 0.1 and grid[1][1] == 0.3 and grid[0][1] != grid[0][1]  # NaN where missing
    assert fmt_value("peak_bytes", 512 * 2**20) == "512.0 MiB" and fmt_value("x", 0.123456) == "0.1235"


def test_run_report_shows_base_and_dense_lora_references_with_retention(runs):
    run = runs["tiny_wanda"]
    res = json.loads((run / "results.json").read_text())
    res["reference"] = {"base": {"metrics": {"perplexity": 80.0, "pubmedqa_acc": 0.25, "pubmedqa_acc_norm": 0.25,
                                             "pubmedqa_n": 8}, "cache": "/cache/base_eval/k.json", "cached": True}}
    (run / "results.json").write_text(json.dumps(res))
    text = write_run_report(run, reference=runs["tiny_dense"]).read_text()
    section = text[text.index("## Against the references"):text.index("## Training loss")]
    assert "| model | perplexity | pubmedqa_acc | pubmedqa_acc_norm |" in section
    assert "| this run | 50 | 0.375 | 0.5 |" in section
    assert "| base model (unpruned, not fine-tuned) | 80 | 0.25 | 0.25 |" in section
    assert "| dense LoRA `tiny_dense` | 40 | 0.5 | 0.4 |" in section
    # by hand: vs dense ppl 40/50 = 0.8, acc .375/.5 = 0.75, acc_norm .5/.4 = 1.25, domain (0.8 + 0.75) / 2
    assert "| vs dense LoRA | 0.775 | 0.8 | 0.75 | 1.25 |" in section
    # vs base ppl 80/50 = 1.6, acc .375/.25 = 1.5, acc_norm .5/.25 = 2, domain (1.6 + 1.5) / 2 = 1.55
    assert "| vs base model | 1.55 | 1.6 | 1.5 | 2 |" in section
    assert "read from `/cache/base_eval/k.json`" in section
    bare = write_run_report(runs["tiny_dense"]).read_text()
    assert "_No reference: the base model was not evaluated" in bare


def test_loss_plot_smoothed_curve_over_raw_with_prune_marks(runs):
    # debiased EMA by hand, span 3 (alpha 0.5): 1, (0.25)/(0.75) = 1/3, (0.125)/(0.875) = 1/7
    assert plots.ema([1.0, 0.0, 0.0], 3) == pytest.approx([1.0, 1 / 3, 1 / 7])
    assert plots.ema_span(12) == 2 and plots.ema_span(300) == 30 and plots.ema_span(10_000) == 50
    res = load_results(runs["tiny_wanda"])
    fig = plots.loss_figure({"w": res["loss_history"]}, {"w": res["prune_steps"]})
    ax = fig.axes[0]
    xs, ys = [p[0] for p in res["loss_history"]], [p[1] for p in res["loss_history"]]
    raw, smooth, *marks = ax.lines
    assert list(raw.get_xdata()) == xs and list(raw.get_ydata()) == ys and raw.get_alpha() < 1
    assert list(smooth.get_ydata()) == pytest.approx(plots.ema(ys, plots.ema_span(len(ys))))
    assert smooth.get_color() == raw.get_color() and smooth.get_linewidth() > raw.get_linewidth()
    assert [list(m.get_xdata()) for m in marks] == [[4.0, 4.0], [8.0, 8.0]]
    text = write_run_report(runs["tiny_wanda"]).read_text()
    assert "Smoothed (EMA, span 2 steps, the bold line)" in text
