"""masks.safetensors: bit-packed on disk (1 bit per weight), read back by `load_masks`, the manifest's
mask_sha256 computable from the file, the unpacked format of earlier versions still readable."""
import hashlib

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xpert_dist.errors import ConfigError
from xpert_dist.prune.maskstore import MaskStore
from xpert_dist.prune.pruner import mask_sha256
from xpert_dist.train.export import MASKS_FORMAT, load_masks, mask_file_sha256, save_masks

SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 173),
          "model.layers.1.mlp.up_proj": (173, 64), "odd": (3, 5), "vector": (13,)}


@pytest.fixture
def masks():
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(s, generator=g) > 0.4 for n, s in SHAPES.items()}


def test_round_trip_equals_the_masks(masks, tmp_path):
    path = save_masks(masks, tmp_path / "masks.safetensors")
    back = load_masks(path)
    assert set(back) == set(masks)
    for n, m in masks.items():
        assert back[n].dtype == torch.bool and back[n].shape == m.shape and torch.equal(back[n], m), n
    store = load_masks(path, packed=True)
    assert isinstance(store, MaskStore) and all(torch.equal(store[n], masks[n]) for n in masks)
    # a MaskStore is written without unpacking and gives the same tensors
    path2 = save_masks(MaskStore(masks), tmp_path / "from_store.safetensors")
    with safe_open(str(path), "pt") as a, safe_open(str(path2), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata()
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_file_is_bit_packed(tmp_path):
    """One bit per weight: payload = ceil(numel / 8) bytes per matrix, file >= 8x smaller than bool
    storage apart from the header."""
    g = torch.Generator().manual_seed(1)
    big = {f"m{i}": torch.rand(256, 512, generator=g) > 0.5 for i in range(8)}
    numel = sum(m.numel() for m in big.values())
    packed = save_masks(big, tmp_path / "packed.safetensors")
    save_file(big, str(tmp_path / "bool.safetensors"))  # the former format: 1 byte per weight
    with safe_open(str(packed), "pt") as f:
        payload = sum(f.get_tensor(k).numel() for k in f.keys())
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
        assert f.metadata()["format"] == MASKS_FORMAT
    assert payload == sum((m.numel() + 7) // 8 for m in big.values()) == numel // 8
    size = packed.stat().st_size
    assert size - payload < 2048  # header only
    assert (tmp_path / "bool.safetensors").stat().st_size >= 7.9 * size
    assert size <= numel / 8 + 2048


def test_mask_sha256_of_the_file_is_the_manifest_hash(masks, tmp_path):
    """mask_sha256 keeps its meaning: sha256 of str(shape) + the row-major mask packed MSB-first,
    computed here by hand from the boolean masks and compared with the pruner's and the file's."""
    path = save_masks(masks, tmp_path / "masks.safetensors")
    by_hand = {}
    for n, m in masks.items():
        flat = m.flatten().tolist() + [False] * (-m.numel() % 8)
        packed = bytes(sum(int(b) << (7 - i) for i, b in enumerate(flat[j:j + 8])) for j in range(0, len(flat), 8))
        by_hand[n] = hashlib.sha256(str(tuple(m.shape)).encode() + packed).hexdigest()
    assert by_hand == {n: mask_sha256(m) for n, m in masks.items()} == mask_file_sha256(path)


def test_unpacked_files_of_earlier_versions_still_load(masks, tmp_path):
    old = tmp_path / "old.safetensors"
    save_file({n: m.contiguous() for n, m in masks.items()}, str(old))
    back = load_masks(old)
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    assert mask_file_sha256(old) == {n: mask_sha256(m) for n, m in masks.items()}


def test_files_that_are_not_masks_are_refused(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ConfigError, match=r"weights.safetensors: w is torch.float32, not a mask"):
        load_masks(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, str(tmp_path / "future.safetensors"),
              metadata={"format": "xpert-dist-masks/v9"})
    with pytest.raises(ConfigError, match=r"unknown format 'xpert-dist-masks/v9'"):
        load_masks(tmp_path / "future.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"junk.safetensors is not readable"):
        load_masks(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match=r"missing.safetensors does not exist"):
        load_masks(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, str(tmp_path / "short.safetensors"),
              metadata={"format": MASKS_FORMAT, "shapes": '{"w": [4, 8]}'})
    with pytest.raises(ConfigError, match=r"short.safetensors is not readable: mask w: 2 packed bytes"):
        load_masks(tmp_path / "short.safetensors")


def test_a_failed_write_keeps_the_previous_file(masks, tmp_path, monkeypatch):
    path = save_masks(masks, tmp_path / "masks.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_masks({n: ~m for n, m in masks.items()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"]
    assert np.array_equal(load_masks(path)["odd"].numpy(), masks["odd"].numpy())


def _repro_main():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "repro_launcher", Path(__file__).resolve().parents[2] / "launchers" / "repro.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_repro_launcher_reads_the_packed_files(masks, tmp_path, capsys):
    """launchers/repro.py counts differing mask entries from the bit-packed files (via load_masks)."""
    import json

    main = _repro_main()

    def write(d, m):
        save_masks(m, d / "masks.safetensors")
        (d / "manifest.json").write_text(json.dumps(
            {"mask_sha256": {n: mask_sha256(k) for n, k in m.items()}, "final_loss": 1.0}))
        return d

    a, b = write(tmp_path / "a", masks), write(tmp_path / "b", masks)
    assert main([str(a), str(b)]) == 0
    write(b, dict(masks, odd=~masks["odd"]))  # all 15 entries of one 3x5 matrix differ
    capsys.readouterr()
    assert main([str(a), str(b), "--json", str(tmp_path / "r.json")]) == 1
    assert "odd" in capsys.readouterr().err
    cmp = json.loads((tmp_path / "r.json").read_text())["comparisons"][0]
    assert cmp["verdict"] == "different" and list(cmp["mask_per_matrix"]) == ["odd"]
    assert cmp["mask_per_matrix"]["odd"]["differing"] == 15 == cmp["mask_total"]["differing"]
    assert cmp["mask_total"]["entries"] == sum(m.numel() for m in masks.values())
