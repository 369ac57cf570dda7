"""Bit-packed mask storage returns exactly what was stored, at one bit per weight."""
import torch

from xpert_dist.prune.maskstore import MaskStore


def test_round_trip_and_size():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(7, 13, generator=g) > 0.4, "b": torch.rand(64, 32, generator=g) > 0.5}
    store = MaskStore(masks)
    assert set(store) == {"a", "b"} and len(store) == 2
    for k, v in masks.items():
        assert store[k].dtype == torch.bool and torch.equal(store[k], v)
    assert store.nbytes() == -(-7 * 13 // 8) + 64 * 32 // 8
    copy = store.copy()
    store["a"] = ~masks["a"]
    assert torch.equal(copy["a"], masks["a"]) and torch.equal(store["a"], ~masks["a"])
