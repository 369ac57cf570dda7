"""Offloaded statistics: bit-identical round trips, clear errors, nothing half-written."""
import os
from pathlib import Path

import pytest
import torch

from xpert_dist.config import PruneConfig
from xpert_dist.stats.capture import InputStats
from xpert_dist.stats.store import StatsStore, StatsStoreError


def sample(dtype=torch.float32, shape=(33, 33), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 1e3
    t.view(-1)[0] = float("1e-40") if dtype != torch.bfloat16 else 0.5  # a subnormal survives too
    return InputStats(t.to(dtype), 1234, "full" if len(shape) == 2 else "diag")


@pytest.mark.parametrize("kind", ["memory", "cpu", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_bit_identical(kind, dtype, tmp_path):
    store = StatsStore(kind, tmp_path / "s" if kind == "disk" else None)
    st = sample(dtype)
    store.put("3.attn_in", st)
    store.put("3.down_in", sample(dtype, shape=(17,), seed=1))
    back = store.get("3.attn_in")
    assert back.sum.dtype == dtype and back.sum.shape == st.sum.shape
    assert torch.equal(back.sum.reshape(-1).view(torch.uint8), st.sum.reshape(-1).view(torch.uint8))
    assert back.n == 1234 and back.mode == "full"
    assert store.used_bytes == st.nbytes() + 17 * st.sum.element_size()
    store.release("3.attn_in")
    assert "3.attn_in" not in store and len(store) == 1
    with pytest.raises(StatsStoreError, match="3.attn_in"):
        store.get("3.attn_in")


def test_disk_files_are_memory_mapped_private_and_reopenable(tmp_path):
    store = StatsStore("disk", tmp_path)
    st = sample()
    store.put("0.mlp_in", st)
    a = store.get("0.mlp_in").sum
    a.zero_()  # private mapping: the file is unchanged
    assert torch.equal(store.get("0.mlp_in").sum, st.sum)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and not any(".tmp-" in f for f in files)
    again = StatsStore.load_directory(tmp_path)
    assert again.keys() == ["0.mlp_in"] and torch.equal(again.get("0.mlp_in").sum, st.sum)
    store.put("0.mlp_in", sample(seed=5))  # replace in place
    assert torch.equal(store.get("0.mlp_in").sum, sample(seed=5).sum)
    store.clear()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StatsStoreError, match=str(blocker / "sub")):
        StatsStore("disk", blocker / "sub")
    # refusals that hold for root too (CI runs as root, which ignores permission bits):
    # the directory is a regular file; an existing directory no process may create files in (procfs)
    with pytest.raises(StatsStoreError, match=rf"{blocker} is not writable: File exists"):
        StatsStore("disk", blocker)
    assert Path("/proc/self/fdinfo").is_dir(), "the test needs Linux procfs"
    with pytest.raises(StatsStoreError, match=r"/proc/self/fdinfo is not writable"):
        StatsStore("disk", Path("/proc/self/fdinfo"))
    assert blocker.read_text() == "x"
    if os.geteuid() != 0:  # permission bits: only for non-root users (root ignores them)
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(StatsStoreError, match="not writable"):
            StatsStore("disk", ro)
    with pytest.raises(StatsStoreError, match="needs a directory"):
        StatsStore("disk")
    with pytest.raises(StatsStoreError, match="kind"):
        StatsStore("gpu")


@pytest.mark.parametrize("kind", ["memory", "cpu", "disk"])
def test_budget_overflow_names_key_and_budget_nothing_written(kind, tmp_path):
    st = sample()
    budget = st.nbytes() + 10
    store = StatsStore(kind, tmp_path if kind == "disk" else None, budget_bytes=budget)
    store.put("0.attn_in", st)
    with pytest.raises(StatsStoreError, match=rf"'0.o_in'.*budget of {budget} bytes"):
        store.put("0.o_in", st)
    assert store.keys() == ["0.attn_in"] and store.used_bytes == st.nbytes()
    if kind == "disk":
        assert len(list(tmp_path.iterdir())) == 2
    store.put("0.attn_in", sample(seed=2))  # replacing within budget is fine
    store.release("0.attn_in")
    store.put("0.o_in", st)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = StatsStore("disk", tmp_path)
    real_fsync = os.fsync
    calls = {"n": 0}

    def flaky(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the metadata fsync fails (e.g. the disk filled up)
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    with pytest.raises(StatsStoreError, match=r"'1.down_in'.*No space left"):
        store.put("1.down_in", sample())
    assert list(tmp_path.iterdir()) == [] and "1.down_in" not in store and store.used_bytes == 0


def test_remote_statistic_refused_and_from_config(tmp_path):
    remote = InputStats(None, 5, "full", diag=torch.ones(3), owner=1)
    with pytest.raises(StatsStoreError, match="resident"):
        StatsStore().put("x", remote)
    cfg = PruneConfig(offload="disk", offload_dir=str(tmp_path / "o"), offload_budget_bytes=1 << 20)
    s = StatsStore.from_config(cfg)
    assert s.kind == "disk" and s.budget_bytes == 1 << 20
    assert StatsStore.from_config(PruneConfig(offload="none")).kind == "memory"


@pytest.mark.parametrize("kind", ["memory", "cpu", "disk"])
def test_plain_tensors_round_trip_and_are_not_statistics(kind, tmp_path):
    store = StatsStore(kind, tmp_path / "s" if kind == "disk" else None)
    t = sample(torch.bfloat16, shape=(5, 7)).sum
    store.put_tensor("layers.0.q_proj", t)
    back = store.get_tensor("layers.0.q_proj")
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    with pytest.raises(StatsStoreError, match="plain tensor"):
        store.get("layers.0.q_proj")
    if kind == "disk":  # reopened after a restart, still a plain tensor
        assert torch.equal(StatsStore.load_directory(tmp_path / "s").get_tensor("layers.0.q_proj"), t)
    with pytest.raises(StatsStoreError, match="expected a tensor"):
        store.put_tensor("x", [1.0])


@pytest.mark.parametrize("durable", [True, False])
def test_scratch_store_skips_fsync_and_round_trips(durable, tmp_path, monkeypatch):
    """durable=False (the pruner's scratch between prune steps) writes no fsync at all; durable (the default)
    fsyncs data, metadata and the directory on every put; both read back bit-identically, under the final names."""
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    store = StatsStore("disk", tmp_path, durable=durable)
    t = sample().sum
    store.put_tensor("model.layers.0.mlp.down_proj", t)
    store.put_tensor("model.layers.0.mlp.down_proj", t + 1)  # replaced in place
    assert len(calls) == (6 if durable else 0)
    assert torch.equal(store.get_tensor("model.layers.0.mlp.down_proj"), t + 1)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name] and len(list(tmp_path.iterdir())) == 2


def test_pruner_scratch_stores_are_not_durable(tmp_path):
    from xpert_dist.prune.pruner import Pruner

    pr = Pruner(PruneConfig(offload="disk"), work_dir=str(tmp_path))
    assert (pr.ema.durable, pr.hessians.durable) == (False, False)
