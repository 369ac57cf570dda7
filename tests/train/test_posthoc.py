"""``train.max_steps=0``: the final step prunes the loaded model one-shot. Pruning a dense LoRA run's
export this way is the post-hoc baseline (LoRA, then prune) the method table derives from its dense cell;
it must give the masks and weights of one run that trains densely and prunes at the end."""
import pytest
import torch

from xpert_dist.config import config_from_dict
from xpert_dist.errors import ConfigError
from xpert_dist.train import pipeline
from xpert_dist.train.export import load_masks

from helpers import SHARED_DATA


def tiny_cfg(out, **sections):
    base = {
        "name": "tiny", "output_dir": str(out), "model": {"tiny": {}},
        "data": {"train": str(SHARED_DATA / "health" / "medquad_train.jsonl"), "seq_len": 32,
                 "max_train_samples": 48, "calib_samples": 8},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3},
        "eval": {"perplexity_windows": 1, "perplexity_seq_len": 32, "tasks": [], "base_reference": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(base)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_the_dense_export_equals_pruning_at_the_end_of_training(tmp_path, method, monkeypatch):
    from safetensors.torch import load_file

    from xpert_dist.models import loading

    tiny_tokenizer = loading.load_tokenizer(tiny_cfg(tmp_path).model)
    monkeypatch.setattr(loading, "load_tokenizer", lambda cfg: tiny_tokenizer)  # the export has no tokenizer

    prune = {"method": method, "schedule": "final_only", "pbs": "off", "mask_final": "end"}
    pipeline.run(tiny_cfg(tmp_path / "together", prune=prune), progress=False)
    pipeline.run(tiny_cfg(tmp_path / "dense", prune={"method": "none"}), progress=False)
    dense = tmp_path / "dense" / "model"
    pipeline.run(tiny_cfg(tmp_path / "after", model={"tiny": None, "name_or_path": str(dense)},
                          train={"max_steps": 0}, prune=prune), progress=False)
    m_together = load_masks(tmp_path / "together" / "masks.safetensors")
    m_after = load_masks(tmp_path / "after" / "masks.safetensors")
    assert m_together.keys() == m_after.keys() and len(m_after) == 14
    for name in m_after:
        agree = (m_together[name] == m_after[name]).float().mean().item()
        assert agree >= 0.999, (name, agree)  # the two merges (peft vs export) differ by float rounding only
    w_t = load_file(str(tmp_path / "together" / "model" / "model.safetensors"))
    w_a = load_file(str(tmp_path / "after" / "model" / "model.safetensors"))
    for name in w_t:
        torch.testing.assert_close(w_a[name], w_t[name], rtol=1e-3, atol=1e-4)


def test_no_training_needs_a_schedule_without_in_loop_steps(tmp_path):
    with pytest.raises(ConfigError, match="max_steps=0"):
        tiny_cfg(tmp_path / "x", train={"max_steps": 0}, prune={"schedule": "steps", "prune_every": 3})
