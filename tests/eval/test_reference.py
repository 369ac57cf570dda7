"""The references a run records for its report: the base model's metrics (evaluated once per model and
evaluation settings, then read from the cache) and a dense-LoRA run's metrics (--reference)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xpert_dist.config import config_from_dict
from xpert_dist.eval import reference
from xpert_dist.eval.retention import evaluate, retention
from xpert_dist.models import loading

from helpers import REPO, SHARED_DATA

FIXTURES = Path(__file__).resolve().parents[1] / "report" / "fixtures"


def tiny(out, cache, **ev):
    return {"name": "ref", "output_dir": str(out), "model": {"tiny": {}}, "lora": {"dropout": 0.0},
            "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 32,
                     "max_train_samples": 16, "calib_samples": 4},
            "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "tensorboard": False},
            "prune": {"method": "wanda", "sparsity": 0.5, "schedule": "final_only", "pbs": "off"},
            "eval": {"perplexity_windows": 2, "perplexity_seq_len": 32, "tasks": [], "cache_dir": str(cache), **ev}}


def test_run_records_base_and_dense_references(tmp_path, monkeypatch):
    dense = tmp_path / "dense"
    shutil.copytree(FIXTURES / "tiny_dense", dense)  # a finished dense-LoRA run (stored results)
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps(tiny(out, cache)))
    proc = subprocess.run([sys.executable, "launchers/run.py", "--config", str(cfg_file), "--reference", str(dense),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    ref = res["reference"]
    assert ref["dense_lora"]["name"] == "tiny_dense" and ref["dense_lora"]["metrics"]["perplexity"] == 40.0
    base = ref["base"]
    assert base["cached"] is False and Path(base["cache"]).parent == cache / "base_eval"

    # oracle: the base model (same tiny config and seed), evaluated here directly
    cfg = config_from_dict(tiny(out, cache))
    model = loading.load_model(cfg.model, seed=cfg.train.seed)
    tok = loading.load_tokenizer(cfg.model)
    direct = evaluate(model, tok, cfg, progress=False)
    assert base["metrics"] == direct
    assert res["metrics"]["perplexity"] != direct["perplexity"]  # the run's own model is another model

    text = (out / "report.md").read_text()
    r = retention(res["metrics"], ref["dense_lora"]["metrics"])
    assert f"| vs dense LoRA | {r['domain_retention']:.4g} | {r['perplexity']:.4g} |" in text
    assert "| dense LoRA `tiny_dense` | 40 |" in text and "computed once and cached in" in text

    # the second time: from the cache, without loading a model; other settings: another cache entry
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("base model evaluated again"))
    again = reference.base_metrics(cfg, tok)
    assert again["cached"] is True and again["metrics"] == direct and again["cache"] == base["cache"]
    other = config_from_dict(tiny(out, cache, perplexity_windows=3))
    assert reference.base_cache_path(other) != reference.base_cache_path(cfg)
    seeded = config_from_dict({**tiny(out, cache), "train": {**tiny(out, cache)["train"], "seed": 1}})
    assert reference.base_cache_path(seeded) != reference.base_cache_path(cfg)  # another random tiny model


def test_reference_run_must_be_a_finished_run(tmp_path):
    from xpert_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval.reference_run=.*no results.json"):
        config_from_dict(tiny(tmp_path / "o", tmp_path / "c", reference_run=str(tmp_path)))


def _evaluate_once_in_child(cfg, out_file):
    res = reference.base_metrics(cfg, None)
    out_file.write_text(json.dumps(res))


def test_concurrent_runs_evaluate_the_base_model_once(tmp_path, monkeypatch):
    """Two processes that need the same (uncached) base entry at once: one evaluates, the other waits and reads."""
    import multiprocessing
    import time

    from xpert_dist.eval import retention as retention_mod

    calls = tmp_path / "calls"

    def slow_evaluate(model, tok, cfg, progress=False):
        with open(calls, "a") as f:
            f.write("evaluated\n")
        time.sleep(1.5)  # long enough that the second process asks while the first still evaluates
        return {"perplexity": 7.0, "perplexity_windows": 2}

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(retention_mod, "evaluate", slow_evaluate)
    cfg = config_from_dict(tiny(tmp_path / "run", tmp_path / "cache"))
    ctx = multiprocessing.get_context("fork")  # the children inherit the stand-in evaluation
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_evaluate_once_in_child, args=(cfg, o)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert calls.read_text().count("evaluated") == 1
    results = [json.loads(o.read_text()) for o in outs]
    assert all(r["metrics"] == {"perplexity": 7.0, "perplexity_windows": 2} for r in results)
    assert sorted(r["cached"] for r in results) == [False, True]


def test_cache_folder_precedence(tmp_path, monkeypatch):
    """eval.cache_dir, then $XPERT_DIST_CACHE, then $XDG_CACHE_HOME/xpert_dist."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("XPERT_DIST_CACHE", raising=False)
    plain = config_from_dict({**tiny(tmp_path, None), "eval": {**tiny(tmp_path, None)["eval"], "cache_dir": None}})
    assert reference.cache_dir(plain) == tmp_path / "xdg" / "xpert_dist"
    monkeypatch.setenv("XPERT_DIST_CACHE", str(tmp_path / "env"))
    assert reference.cache_dir(plain) == tmp_path / "env"
    assert reference.cache_dir(config_from_dict(tiny(tmp_path, tmp_path / "cfg"))) == tmp_path / "cfg"
