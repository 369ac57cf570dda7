"""retention() on hand-computed cases; evaluate() on a tiny model and the packaged data sample."""
import math

import pytest

from xpert_dist.config import EvalConfig, ModelConfig, RunConfig
from xpert_dist.errors import ConfigError
from xpert_dist.eval.multiple_choice import choice_accuracy, pubmedqa_items
from xpert_dist.eval.perplexity import heldout_windows, perplexity
from xpert_dist.eval.retention import evaluate, retention
from xpert_dist.data.sources import load_records


def test_retention_hand_case():
    pruned = {"perplexity": 20.0, "pubmedqa_acc": 0.5, "pubmedqa_acc_norm": 0.6, "pubmedqa_n": 100,
              "perplexity_windows": 16}
    dense = {"perplexity": 10.0, "pubmedqa_acc": 0.625, "pubmedqa_acc_norm": 0.5, "pubmedqa_n": 100,
             "perplexity_windows": 16}
    r = retention(pruned, dense)
    assert r == {"perplexity": 0.5, "pubmedqa_acc": 0.8, "pubmedqa_acc_norm": 1.2,
                 "domain_retention": pytest.approx(0.65)}  # (0.5 + 0.8) / 2: each task counts once
    assert retention(dense, dense)["domain_retention"] == 1.0


def test_retention_undefined_and_missing():
    r = retention({"perplexity": 12.0, "casehold_acc": 0.3, "extra_acc": 0.9},
                  {"perplexity": 9.0, "casehold_acc": 0.0})
    assert r["perplexity"] == pytest.approx(0.75)
    assert math.isnan(r["casehold_acc"])  # dense accuracy 0: undefined, left out of the mean
    assert "extra_acc" not in r  # not measured on the dense model
    assert r["domain_retention"] == pytest.approx(0.75)
    assert math.isnan(retention({}, {})["domain_retention"])


def test_evaluate_tiny_model_on_sample(sample_data, tiny_model, tok):
    cfg = RunConfig(domain="health", model=ModelConfig(tiny={}),
                    eval=EvalConfig(perplexity_windows=2, perplexity_seq_len=64, tasks=["pubmedqa"],
                                    max_task_examples=2, batch_size=2))
    m = evaluate(tiny_model, tok, cfg, progress=False)
    assert set(m) == {"perplexity", "perplexity_windows", "pubmedqa_acc", "pubmedqa_acc_norm", "pubmedqa_n"}
    windows = heldout_windows("health_heldout", tok, 64, 2)
    assert m["perplexity"] == pytest.approx(perplexity(tiny_model, windows, progress=False), rel=1e-9)
    items = pubmedqa_items(load_records("pubmedqa").select(range(2)))
    ref = choice_accuracy(tiny_model, tok, items, max_len=256, progress=False)
    assert (m["pubmedqa_acc"], m["pubmedqa_acc_norm"], m["pubmedqa_n"]) == (ref["acc"], ref["acc_norm"], 2)


def test_evaluate_config_errors(sample_data, tiny_model, tok):
    custom = RunConfig(domain="custom", eval=EvalConfig(perplexity_windows=1))
    with pytest.raises(ConfigError, match="eval.perplexity_data"):
        evaluate(tiny_model, tok, custom, progress=False)
    too_long = RunConfig(eval=EvalConfig(perplexity_windows=1, perplexity_seq_len=512))
    with pytest.raises(ConfigError, match="eval.perplexity_seq_len=512 exceeds .* 256"):
        evaluate(tiny_model, tok, too_long, progress=False)
    skipped = RunConfig(domain="custom", eval=EvalConfig(perplexity_windows=0))
    assert evaluate(tiny_model, tok, skipped, progress=False) == {}
