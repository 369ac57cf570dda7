"""The training pipeline end to end on a tiny random Llama (single process): export, sparsity,
resume, and bad input refused before any expensive work."""
import json
import time

import pytest
import torch

from xpert_dist.config import config_from_dict
from xpert_dist.errors import ConfigError
from xpert_dist.train import pipeline
from xpert_dist.train.export import load_masks

from helpers import SHARED_DATA


def tiny_cfg(out, **sections):
    base = {
        "name": "tiny", "output_dir": str(out),
        "model": {"tiny": {}},
        "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 32,
                 "max_train_samples": 48, "calib_samples": 8},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3},
        "prune": {"sparsity": 0.5, "schedule": "steps", "prune_every": 3},
        "eval": {"perplexity_windows": 2, "perplexity_seq_len": 32, "tasks": []},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(base)


def test_export_reloads_with_exact_sparsity(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tmp_path / "run")
    res = pipeline.run(cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    masks = load_masks(tmp_path / "run" / "masks.safetensors")
    assert len(masks) == 14
    sd = model.state_dict()
    for name, keep in masks.items():
        W = sd[f"{name}.weight"]
        assert int((~keep).sum()) == round(0.5 * keep.numel()), name
        assert float(W[~keep].abs().max()) == 0.0, f"{name} re-densified"
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(man["mask_sha256"]) == set(masks)
    assert man["data_sha256"] and man["versions"]["torch"].startswith("2.13")
    assert (tmp_path / "run" / "report.md").is_file()
    assert "perplexity" in " ".join(res["metrics"])
    assert len(res["loss_history"]) == 6 and res["prune_steps"] == [3]
    assert [k for k, _ in res["step_seconds"]] == list(range(1, 7)) and all(s > 0 for _, s in res["step_seconds"])
    assert res["timed_from_step"] == 0


def test_ema_offloaded_to_disk_gives_the_same_run_and_cleans_up(tmp_path):
    """prune.offload=disk (the laptop configs) vs host memory: same masks, same metrics; the offload
    folder is gone once the final prune step no longer needs the smoothed scores."""
    runs = {off: pipeline.run(tiny_cfg(tmp_path / off, prune={"offload": off}), progress=False)
            for off in ("cpu", "disk")}
    shas = {off: json.loads((tmp_path / off / "manifest.json").read_text())["mask_sha256"] for off in runs}
    assert shas["cpu"] == shas["disk"]
    assert runs["cpu"]["metrics"]["perplexity"] == runs["disk"]["metrics"]["perplexity"]
    assert not (tmp_path / "disk" / "offload").exists()


def interrupted_then_resumed(cfg, monkeypatch, steps: int) -> dict:
    """``cfg``'s run stopped (as by SIGTERM) after ``steps`` optimizer steps, then run again to the end."""
    from xpert_dist.launch import signals

    calls = {"n": 0}
    real = signals.stop_requested

    def stop_after(sync=True):
        calls["n"] += 1
        return calls["n"] >= steps or real(sync=False)
    monkeypatch.setattr(signals, "stop_requested", stop_after)
    with pytest.raises(signals.Preempted):
        pipeline.run(cfg, progress=False)
    monkeypatch.setattr(signals, "stop_requested", lambda sync=True: False)
    signals.reset()
    return pipeline.run(cfg, progress=False)


def test_resume_after_interrupt_gives_identical_masks(tmp_path, monkeypatch):
    """A run stopped after step 4 and resumed ends with the masks and weights of an uninterrupted run."""
    from safetensors.torch import load_file

    ref = pipeline.run(tiny_cfg(tmp_path / "ref"), progress=False)
    res = interrupted_then_resumed(tiny_cfg(tmp_path / "cut", train={"checkpoint_every": 2}), monkeypatch, 4)
    a = load_masks(tmp_path / "ref" / "masks.safetensors")
    b = load_masks(tmp_path / "cut" / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wa = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert [s for s, _ in res["loss_history"]] == list(range(1, 7))
    assert res["loss_history"] == ref["loss_history"]
    # the resumed process timed steps 5-6 only, and says so (bench/method_table/report.py then shows no time ratio)
    assert res["timed_from_step"] == 4 and [k for k, _ in res["step_seconds"]] == [5, 6]


def test_resumed_run_keeps_the_draw_and_the_carried_xtx(tmp_path, monkeypatch):
    """Stopped after step 3 (one prune step done, at step 2) and resumed, a run with data.calib_sets and
    prune.hessian_carry ends with the weights of an uninterrupted one: the resumed prune steps take the
    next draws and the carried XᵀX comes back from the checkpoint."""
    from safetensors.torch import load_file

    sections = dict(data={"calib_sets": 3}, prune={"prune_every": 2, "reconstruct": "obs", "pbs": "off",
                                                     "hessian_carry": 1.0})
    pipeline.run(tiny_cfg(tmp_path / "ref", **sections), progress=False)
    pipeline.run(tiny_cfg(tmp_path / "plain", data={"calib_sets": 3},
                          prune={"prune_every": 2, "reconstruct": "obs", "pbs": "off"}), progress=False)
    pipeline.run(tiny_cfg(tmp_path / "one_draw", prune=sections["prune"]), progress=False)
    interrupted_then_resumed(tiny_cfg(tmp_path / "cut", train={"checkpoint_every": 1}, **sections), monkeypatch, 3)
    w = {r: load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("ref", "cut", "plain", "one_draw")}
    for k in w["ref"]:
        torch.testing.assert_close(w["cut"][k], w["ref"][k], rtol=0, atol=0)
    for other in ("plain", "one_draw"):  # the carry, and the later steps' own draws, changed the run
        assert any(not torch.equal(w[other][k], w["ref"][k]) for k in w["ref"]), other


@pytest.mark.parametrize("sections, match", [
    ({"data": {"train": "/nonexistent/train.jsonl"}}, "does not exist"),
    ({"data": {"seq_len": 100000}}, "seq_len"),
    ({"lora": {"target_modules": ["q_proj", "c_attn"]}}, "target_modules"),
])
def test_bad_input_fails_fast(tmp_path, sections, match):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        pipeline.run(tiny_cfg(tmp_path / "run", **sections), progress=False)
    assert time.perf_counter() - t0 < 20
    assert not (tmp_path / "run" / "model").exists()


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty|no "):
        pipeline.run(tiny_cfg(tmp_path / "run", data={"train": str(empty)}), progress=False)


def test_ds_config_contradicting_run_config(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        pipeline.run(tiny_cfg(tmp_path / "run", ds_config=str(ds)), progress=False)


def test_sparsity_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="prune.sparsity"):
        tiny_cfg(tmp_path, prune={"sparsity": 1.0})


def test_interrupted_export_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """A crash while writing the model keeps the earlier export intact and leaves no partial dir."""
    from transformers import PreTrainedModel

    cfg = tiny_cfg(tmp_path / "run")
    pipeline.run(cfg, progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "model").iterdir())
    real = PreTrainedModel.save_pretrained

    def crash(self, path, *a, **k):
        real(self, path, *a, **k)
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        pipeline.run(tiny_cfg(tmp_path / "run", prune={"sparsity": 0.25}), progress=False)
    after = sorted(p.name for p in (tmp_path / "run" / "model").iterdir())
    assert before == after
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".") and "model" in p.name]


@pytest.mark.parametrize("method, schedule", [("none", "steps"), ("wanda", "final_only"),
                                              ("wanda", "before_training"), ("sparsegpt", "final_only"),
                                              ("magnitude", "steps")])
def test_baselines_through_same_entry_point(tmp_path, method, schedule):
    cfg = tiny_cfg(tmp_path / "run", prune={"method": method, "schedule": schedule, "pbs": "off"})
    res = pipeline.run(cfg, progress=False)
    if method == "none":
        assert res["sparsity"] == {}
    else:
        assert len(res["sparsity"]) == 14 and all(abs(v - 0.5) < 0.01 for v in res["sparsity"].values())


def test_qlora_4bit_base_prunes_and_exports_dense_sparse(tmp_path):
    """QLoRA: a 4-bit (NF4, bitsandbytes) base is scored dequantised, re-quantised with exact zeros,
    and exported as a plain dense checkpoint with the exact target sparsity."""
    from transformers import AutoModelForCausalLM

    from helpers import tiny_model

    src = tmp_path / "tiny_base"
    tiny_model().save_pretrained(src)
    cfg = tiny_cfg(tmp_path / "run", model={"tiny": None, "name_or_path": str(src), "quantization": "4bit"})
    from xpert_dist.models.loading import ByteTokenizer
    import xpert_dist.models.loading as loading

    orig = loading.load_tokenizer
    loading.load_tokenizer = lambda c: ByteTokenizer(256)
    try:
        pipeline.run(cfg, progress=False)
    finally:
        loading.load_tokenizer = orig
    masks = load_masks(tmp_path / "run" / "masks.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    sd = model.state_dict()
    for name, keep in masks.items():
        assert int((~keep).sum()) == round(0.5 * keep.numel())
        assert float(sd[f"{name}.weight"][~keep].abs().max()) == 0.0


def test_resume_with_a_different_config_is_refused(tmp_path, monkeypatch):
    from xpert_dist.launch import signals

    cfg = tiny_cfg(tmp_path / "run", train={"checkpoint_every": 2})
    monkeypatch.setattr(signals, "stop_requested", lambda sync=True: True)
    with pytest.raises(signals.Preempted):
        pipeline.run(cfg, progress=False)
    monkeypatch.setattr(signals, "stop_requested", lambda sync=True: False)
    changed = tiny_cfg(tmp_path / "run", train={"checkpoint_every": 2}, prune={"sparsity": 0.3})
    with pytest.raises(ConfigError, match="prune.sparsity"):
        pipeline.run(changed, progress=False)


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    """Recomputing activations in backward changes memory, not the result."""
    a = pipeline.run(tiny_cfg(tmp_path / "a", lora={"dropout": 0.0}), progress=False)
    b = pipeline.run(tiny_cfg(tmp_path / "b", lora={"dropout": 0.0}, train={"gradient_checkpointing": True}),
                     progress=False)
    for (sa, la), (sb, lb) in zip(a["loss_history"], b["loss_history"]):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5)
    assert a["prune_reports"][-1]["mask_sha256"] == b["prune_reports"][-1]["mask_sha256"]
