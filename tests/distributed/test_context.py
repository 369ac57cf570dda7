"""Single-process context, environment selection, comm helpers and DeepSpeed-hook suspension (no processes)."""
import functools

import pytest
import torch

from xpert_dist.distributed import DistContext, from_environment
from xpert_dist.distributed.comm import guard, timeout_seconds
from xpert_dist.distributed.zero import _is_deepspeed_hook, suspended_zero_hooks
from xpert_dist.errors import DistributedError
from xpert_dist.stats.tree import contiguous_shard


def test_single_process_context_is_identity():
    ctx = DistContext()
    assert list(ctx.shard(5)) == [0, 1, 2, 3, 4] and list(ctx.global_batch_indices(3)) == [0, 1, 2]
    lin = torch.nn.Linear(3, 2)
    with ctx.gather(lin, modify=True):
        ctx.write_frozen(lin.weight, torch.ones(2, 3))
    ctx.write_trainable(lin.bias, torch.zeros(2))
    assert torch.equal(lin.weight, torch.ones(2, 3)) and torch.equal(lin.bias, torch.zeros(2))
    assert ctx.compute_owned(["a", "b"], {}, lambda k: {"k": k}) == {"a": {"k": "a"}, "b": {"k": "b"}}
    assert ctx.broadcast_object(7) == 7 and ctx.all_gather_object(3) == [3]


def test_from_environment_single(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert type(from_environment()) is DistContext
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert type(from_environment()) is DistContext


def test_shards_are_contiguous_and_cover():
    for k in range(0, 30):
        for w in range(1, 9):
            got = [list(contiguous_shard(k, w, r)) for r in range(w)]
            assert sum(got, []) == list(range(k))
            assert max(map(len, got)) - min(map(len, got)) <= 1


def test_timeout_and_guard(monkeypatch):
    monkeypatch.delenv("XPERT_DIST_TIMEOUT_S", raising=False)
    assert timeout_seconds() == 60.0
    monkeypatch.setenv("XPERT_DIST_TIMEOUT_S", "7.5")
    assert timeout_seconds() == 7.5 and timeout_seconds(3) == 3.0
    monkeypatch.setenv("XPERT_DIST_TIMEOUT_S", "soon")
    with pytest.raises(DistributedError, match="XPERT_DIST_TIMEOUT_S"):
        timeout_seconds()
    with pytest.raises(DistributedError, match=r"all_reduce failed on rank 3 with peer rank 1.*Connection"):
        with guard("all_reduce", 3, peer=1):
            raise RuntimeError("Connection closed by peer")


def _ds_like_hook(*a):
    return None


_ds_like_hook.__module__ = "deepspeed.runtime.zero.parameter_offload"


def test_suspended_hooks_remove_only_deepspeed_hooks_and_restore_order():
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    calls = []
    mine = lambda m, a: calls.append("mine")  # noqa: E731
    wrapped = functools.wraps(_ds_like_hook)(lambda *a: calls.append("ds"))
    h1 = seq[0].register_forward_pre_hook(wrapped)
    h2 = seq[0].register_forward_pre_hook(mine)
    assert _is_deepspeed_hook(wrapped) and not _is_deepspeed_hook(mine)
    with suspended_zero_hooks(seq):
        seq(torch.zeros(1, 2))
        h3 = seq[1].register_forward_hook(lambda m, a, o: calls.append("added"))
        seq(torch.zeros(1, 2))
        h3.remove()
    assert calls == ["mine", "mine", "added"]
    calls.clear()
    seq(torch.zeros(1, 2))
    assert calls == ["ds", "mine"]  # restored, in the original order
    h1.remove(), h2.remove()
