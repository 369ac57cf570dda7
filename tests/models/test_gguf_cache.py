"""The dequantised-GGUF cache's bookkeeping (``loading.gguf_plain_copy``), with the dequantisation itself
replaced by a stub that writes a marker file: which key a source gets, when the copy is made, and that a copy
another process renamed into place first wins. That the copy is transformers' dequantisation exactly is tested on
the real SmolLM2 in tests/train/test_smollm2_real.py."""
import os

import pytest

from xpert_dist.config import ModelConfig
from xpert_dist.models import loading


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("XPERT_DIST_CACHE", str(tmp_path / "cache"))
    made = []

    def save(model, tok, target, dtype=None):
        made.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text(str(os.getpid()))
        return target

    monkeypatch.setattr(loading, "load_model", lambda cfg, seed=0: object())
    monkeypatch.setattr(loading, "load_tokenizer", lambda cfg: object())
    monkeypatch.setattr(loading, "save_plain_checkpoint", save)
    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    return f, made


def test_copy_made_once_and_keyed_by_file_and_dtype(fake_gguf):
    f, made = fake_gguf
    cfg = ModelConfig(name_or_path=str(f))
    first = loading.gguf_plain_copy(cfg)
    assert first.parent.name == "gguf" and first.name.startswith("m.Q4-") and len(made) == 1
    assert loading.gguf_plain_copy(cfg) == first and len(made) == 1  # read, not made again
    assert loading.gguf_plain_copy(ModelConfig(name_or_path=str(f), dtype="bfloat16")) != first  # another dtype
    os.utime(f, ns=(1, 1))  # the file changed (its modification time): a new copy
    assert loading.gguf_plain_copy(cfg) not in (first, None) and len(made) == 3
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no private folder left behind


def test_no_copy_when_off_not_gguf_or_under_zero_init(fake_gguf, tmp_path, monkeypatch):
    f, made = fake_gguf
    assert loading.gguf_plain_copy(ModelConfig(name_or_path=str(f), gguf_cache=False)) is None
    assert loading.gguf_plain_copy(ModelConfig(tiny={"num_hidden_layers": 1})) is None
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert loading.gguf_plain_copy(ModelConfig(name_or_path=str(folder))) is None
    assert loading.gguf_plain_copy(ModelConfig(name_or_path=str(f)), create=False) is None
    import transformers.integrations.deepspeed as hf_ds

    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: True)  # a model built now would be partitioned
    assert loading.gguf_plain_copy(ModelConfig(name_or_path=str(f))) is None and made == []


def test_a_copy_renamed_into_place_first_wins(fake_gguf, monkeypatch):
    """Two ranks make the copy at once: the one whose rename comes second drops its private folder and reads
    the winner's copy; a rename that fails with no copy in place is an error, not a silent miss."""
    f, made = fake_gguf
    cfg = ModelConfig(name_or_path=str(f))
    real_rename = os.rename

    def raced(src, dst):  # the other rank's copy lands between our write and our rename
        os.makedirs(dst)
        with open(os.path.join(dst, "config.json"), "w") as fh:
            fh.write("other")
        real_rename(src, dst)  # fails: dst is a non-empty folder

    monkeypatch.setattr(loading.os, "rename", raced)
    target = loading.gguf_plain_copy(cfg)
    assert (target / "config.json").read_text() == "other"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # our private copy is gone
    monkeypatch.setattr(loading.os, "rename", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    os.utime(f, ns=(2, 2))
    with pytest.raises(OSError, match="disk full"):
        loading.gguf_plain_copy(cfg)


def test_every_rank_of_a_process_group_writes_a_whole_copy(tmp_path):
    """transformers' save_pretrained writes a model only on rank 0 of an initialised process group (on rank 1 it
    wrote nothing, and the copy that rank renamed into place held a tokenizer alone: the 2-rank SLURM run failed).
    save_plain_checkpoint writes the weights and config itself: on both ranks of a gloo group the folder holds them,
    and reloaded with plain transformers the weights are the model's (tied embedding included)."""
    from tests.distributed.harness import ok, run_ranks
    from tests.distributed.zero3_load_workers import save_plain_on_every_rank

    res = ok(run_ranks(save_plain_on_every_rank, 2, str(tmp_path), timeout=120))
    for rank, r in res.items():
        assert {"config.json", "model.safetensors"} <= set(r["files"]), (rank, r["files"])
        assert r["digests"] == r["want"], rank


def test_making_the_copy_leaves_the_callers_random_state_alone(fake_gguf, monkeypatch):
    """Making the copy builds a model (random init); a run seeds before it, so the draw would shift the LoRA
    initialisation of a machine's first run against its later ones (which find the copy). The caller's torch
    RNG is where it was: the next draw equals the one without the copy being made."""
    import torch

    f, made = fake_gguf
    real_save = loading.save_plain_checkpoint

    def drawing_save(model, tok, target, dtype=None):
        torch.randn(1000)  # what from_config's initialisation does
        return real_save(model, tok, target, dtype)

    monkeypatch.setattr(loading, "save_plain_checkpoint", drawing_save)
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    assert loading.gguf_plain_copy(ModelConfig(name_or_path=str(f))) is not None and len(made) == 1
    assert torch.equal(torch.rand(3), want)
