"""StatsCollector with global batch indices: partials of any sharding merge to the same bits."""
import pytest
import torch

from xpert_dist.errors import DistributedError, StatisticsError
from xpert_dist.models.loading import tiny_llama_config
from xpert_dist.stats.capture import InputStats, StatsCollector, merge_partials, stats_for
from xpert_dist.stats.sequential import full_forward_stats, sequential_calibration, shard_rows
from xpert_dist.stats.tree import contiguous_shard


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (11, 12), generator=g)  # 6 batches of 2 (last one has 1 row)


def _seq_stats(model, ids, mode, batch_size, rows=None, indices=None):
    got = {}
    sequential_calibration(model, ids if rows is None else rows, lambda i, b, s: got.__setitem__(i, s), mode=mode,
                           batch_size=batch_size, progress=False, batch_indices=indices)
    return got


@pytest.mark.parametrize("mode", ["diag", "full"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_sequential_shards_merge_bit_identical(model, ids, mode, world):
    torch.set_num_threads(1)
    bs = 2
    K = -(-ids.shape[0] // bs)
    ref = _seq_stats(model, ids, mode, bs)
    parts = []
    for r in range(world):
        local = contiguous_shard(K, world, r)
        parts.append(_seq_stats(model, ids, mode, bs, rows=shard_rows(ids, bs, local), indices=local))
    for i in ref:
        for g in ref[i]:
            merged = merge_partials([p[i][g] for p in parts])
            assert merged.n == ref[i][g].n
            assert torch.equal(merged.sum, ref[i][g].sum), (i, g)


def test_full_forward_matches_sequential_without_pruning(model, ids):
    a = full_forward_stats(model, ids, mode="full", batch_size=3)
    b = _seq_stats(model, ids, "full", 3)
    for i in a:
        for g in a[i]:
            assert torch.equal(a[i][g].sum, b[i][g].sum)


def test_collector_leaf_accumulates_within_a_batch():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(6, 4)
    with StatsCollector({"q_proj": lin, "k_proj": lin}, mode="full") as col:
        col.set_batch(0)
        lin(x[:3])
        lin(x[3:])  # same leaf
        col.set_batch(1)
        lin(x)
    st = col.stats()["attn_in"]
    leaf0 = x[:3].T @ x[:3]
    leaf0 += x[3:].T @ x[3:]
    assert torch.equal(st.sum, leaf0 + x.T @ x) and st.n == 12
    assert stats_for(col.stats(), "q_proj").n == 12


def test_collector_running_mode_and_errors():
    lin = torch.nn.Linear(4, 3)
    with StatsCollector({"o_proj": lin}, mode="diag", reduction="running") as col:
        lin(torch.ones(2, 4))
        lin(torch.ones(2, 4))
    st = col.stats()["o_in"]
    assert torch.equal(st.sum, torch.full((4,), 4.0)) and st.nodes is None
    with pytest.raises(StatisticsError, match="unknown statistics mode"):
        StatsCollector({"o_proj": lin}, mode="bogus")
    with StatsCollector({"o_proj": lin}) as col:
        pass
    with pytest.raises(StatisticsError, match="no calibration data"):
        col.stats()
    assert col.stats(allow_empty=True)["o_in"].empty
    with StatsCollector({"o_proj": lin}) as col:
        col.set_batch(0)
        lin(torch.ones(1, 4))
        col.set_batch(2)
        lin(torch.ones(1, 4))
    with pytest.raises(StatisticsError, match="contiguous"):
        col.stats()


def test_input_stats_api():
    h = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    st = InputStats(h, 5, "full")
    assert torch.equal(st.diag, torch.tensor([2.0, 3.0])) and st.hessian is h and st.nbytes() == 16
    assert (st + st).n == 10 and st == InputStats(h.clone(), 5, "full")
    with pytest.raises(StatisticsError, match="stats mode 'full'"):
        InputStats(h.diagonal(), 5, "diag").hessian
    remote = InputStats(None, 5, "full", diag=torch.tensor([2.0, 3.0]), owner=3)
    assert torch.equal(remote.diag, st.diag) and not remote.resident and remote.shape == (2, 2)
    with pytest.raises(DistributedError, match="rank 3"):
        remote.hessian


def test_partials_on_another_device_same_bits(model, ids):
    """Tree partials kept on the host (stats offload) give the same bits (here cpu -> cpu, meta-free)."""
    a = _seq_stats(model, ids, "full", 2)
    got = {}
    sequential_calibration(model, ids, lambda i, b, s: got.__setitem__(i, s), mode="full", batch_size=2,
                           progress=False, partials_device="cpu")
    for i in a:
        for g in a[i]:
            assert torch.equal(a[i][g].sum, got[i][g].sum)


@pytest.mark.parametrize("n,block", [(300, 128), (257, 64), (96, 128), (512, None)])
@pytest.mark.parametrize("start", [False, True])
def test_gram_into_matches_a_float64_product(n, block, start):
    """The upper panels, mirrored, are XᵀX (float64 oracle), added into ``into`` in place when given; uneven last
    panels and a single panel (n <= block) included."""
    from xpert_dist.stats.capture import gram_into

    g = torch.Generator().manual_seed(n)
    x = torch.randn(200, n, generator=g)
    into = torch.randn(n, n, generator=g) if start else None
    want = x.double().T @ x.double() + (into.double() if start else 0)
    before = into.clone() if start else None
    got = gram_into(x, into, block)
    assert got.shape == (n, n) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
    if start:
        assert got.data_ptr() == into.data_ptr()  # accumulated in place
        assert (got.double() - before.double() - (x.double().T @ x.double())).abs().max() <= 1e-3
    else:
        b = block or max(128, -(-n // 4))
        if n > b:  # off the diagonal panels the mirror is exact
            assert torch.equal(got[b:, :b], got[:b, b:].T)
