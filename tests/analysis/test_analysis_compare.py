"""The run comparison page renders from stored results (nothing re-run): sections, numbers, valid PNGs."""
import json
import re

import pytest

from xpert_dist.analysis.compare import write_comparison_page
from xpert_dist.errors import ConfigError
from xpert_dist.report.plots import PIXELS

from analysis_helpers import png_size, write_run


@pytest.fixture
def runs(tmp_path):
    dense = write_run(tmp_path / "dense", "dense", "none", {"perplexity": 10.0, "pubmedqa_acc": 0.5}, 0.0)
    xpert = write_run(tmp_path / "xpert", "xpert", "foresight", {"perplexity": 12.5, "pubmedqa_acc": 0.45}, 0.5,
                      seed=1, prune_steps=[2, 4])
    wanda = write_run(tmp_path / "wanda", "wanda", "wanda", {"perplexity": 20.0, "pubmedqa_acc": 0.4}, 0.5, seed=2)
    return [dense, xpert, wanda]


def test_comparison_page_from_stored_results(runs, tmp_path):
    out = tmp_path / "cmp"
    before = {p: (p / "results.json").stat().st_mtime_ns for p in runs}
    page = write_comparison_page(runs, out, reference="dense")
    text = page.read_text()
    for section in ("## Retention", "## Metrics", "## Training loss", "## Per-layer sparsity", "## Time and peak memory",
                    "## Prune steps", "## Mask movement between prune steps", "## Mask overlap between runs",
                    "## Artifacts"):
        assert section in text, section
    # retention = dense ppl / ppl, acc / dense acc, by hand: xpert ppl 10/12.5 = 0.8, acc 0.45/0.5 = 0.9,
    # domain (0.8 + 0.9) / 2 = 0.85; wanda 10/20 = 0.5, 0.4/0.5 = 0.8, domain 0.65; dense 1 throughout
    retention = text[text.index("## Retention"):text.index("## Metrics")]
    rows = [ln for ln in retention.splitlines() if ln.startswith("| ") and not ln.startswith("| run ")]
    assert "| run | domain_retention | perplexity | pubmedqa_acc |" in retention
    assert rows == ["| dense | 1 | 1 | 1 |", "| xpert | 0.85 | 0.8 | 0.9 |", "| wanda | 0.65 | 0.5 | 0.8 |"]
    # every linked image exists and is a PNG of the report's fixed size
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert {"compare_retention.png", "compare_loss.png", "compare_movement.png"} <= set(images)
    for name in images:
        assert png_size(out / name) == PIXELS, name
    # links to manifests resolve relative to the page
    for link in re.findall(r"\]\(([^)]+manifest\.json)\)", text):
        assert (out / link).resolve().is_file()
    # the runs were only read
    assert before == {p: (p / "results.json").stat().st_mtime_ns for p in runs}
    # movement table: xpert has two moving steps (1, 2), wanda (one prune step) none
    movement = text.split("## Mask movement between prune steps")[1].split("\n## ")[0]
    assert re.search(r"\| xpert \| 1 \|", movement) and re.search(r"\| xpert \| 2 \(final\) \|", movement)
    assert "wanda" not in movement
    # overlap of two independent random masks at 50 %: near 1/3
    ov = next(line for line in text.splitlines() if line.startswith("| xpert | wanda |"))
    assert 0.2 < float(ov.split("|")[4]) < 0.5


def test_compare_cli_and_errors(runs, tmp_path, analyze, capsys):
    assert analyze.main(["compare", *map(str, runs), "--out", str(tmp_path / "c2")]) == 0
    assert "comparison.md" in capsys.readouterr().out
    assert (tmp_path / "c2" / "comparison.md").is_file()
    assert analyze.main(["compare", str(runs[0]), "--out", str(tmp_path / "c3"), "--reference", "nope"]) == 2
    with pytest.raises(ConfigError):
        write_comparison_page([], tmp_path / "c4")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"no_name": 1}))
    with pytest.raises(ConfigError, match="name"):
        write_comparison_page([bad], tmp_path / "c5")
