"""reduce_stats by reduce-scatter + gather (distributed/scatter_reduce.py) gives the same bits as
sending whole partials to the owner and as one process folding every leaf (canonical tree for
"tree" partials, rank-order sum for "running" ones), on 2 and 3 gloo ranks, with uneven batch
splits, ranks that saw no batch and matrices with fewer rows than ranks."""
import sys

import numpy as np
import pytest
import torch

from helpers import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.distributed import scatter_workers as sw  # noqa: E402
from tests.distributed.harness import ok, run_ranks  # noqa: E402

pytestmark = pytest.mark.slow


def oracle(kind, shape, spans):
    from xpert_dist.stats.tree import canonical_sum

    if kind == "tree":
        K = max(stop for _, stop in spans)
        return canonical_sum([sw.leaf(g, shape) for g in range(K)])
    acc = None
    for start, stop in spans:  # one partial per rank, summed in rank order
        if stop > start:
            v = sw.running_partial(shape, start, stop)
            acc = v.clone() if acc is None else acc + v
    return acc


def test_row_chunks_tile_the_rows():
    from xpert_dist.distributed.scatter_reduce import row_chunks

    for n, p in [(10, 3), (2, 3), (28672, 64), (1, 1)]:
        ch = row_chunks(n, p)
        assert len(ch) == p and [i for c in ch for i in c] == list(range(n))
        assert max(map(len, ch)) - min(map(len, ch)) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_scatter_bit_equal_to_whole_partials_and_single_process(world):
    got = ok(run_ranks(sw.reduce_both_paths, world, timeout=150))
    for r in range(world):  # the reduce-scatter path really ran, once per case, on every rank
        assert got[r]["scatter_calls"] == [c[0] for c in sw.CASES[world]]
    for name, kind, mode, shape, spans in sw.CASES[world]:
        want = oracle(kind, shape, spans)
        n = sum(g + 1 for a, b in spans for g in range(a, b))
        owner_sums = {}
        for path in ("scatter", "whole"):
            owners = {got[r]["results"][(name, path)]["owner"] for r in range(world)}
            assert len(owners) == 1, (name, path, owners)
            owner = owners.pop()
            for r in range(world):
                res = got[r]["results"][(name, path)]
                assert res["n"] == n
                if r == owner or mode == "diag":
                    assert res["sum"] is not None, (name, path, r)
                    full = torch.from_numpy(np.frombuffer(res["sum"], dtype=np.float32).reshape(shape).copy())
                    assert torch.equal(full, want), (name, path, r, "not the single-process fold")
                else:
                    assert res["sum"] is None, (name, path, r)  # non-owners hold only the diagonal
                diag = torch.from_numpy(np.frombuffer(res["diag"], dtype=np.float32).copy())
                assert torch.equal(diag, want if mode == "diag" else want.diagonal()), (name, path, r)
            owner_sums[path] = got[owner]["results"][(name, path)]["sum"]
        assert owner_sums["scatter"] == owner_sums["whole"], name


def test_the_oracle_depends_on_the_association():
    """The leaves make the fold order visible (else bit-equality above could not fail)."""
    shape = (10, 10)
    seq = sw.leaf(0, shape)
    for g in range(1, 7):
        seq = seq + sw.leaf(g, shape)
    assert not torch.equal(seq, oracle("tree", shape, [(0, 5), (5, 5), (5, 7)]))


def test_dead_rank_in_reduce_scatter_raises_distributed_error_in_bounded_time():
    timeout = 6.0
    res = run_ranks(sw.dies_in_reduce_scatter, 3, timeout, 1, timeout=90, allow_missing={1})
    assert 1 not in res
    for r in (0, 2):
        status, out = res[r]
        assert status == "ok", out
        assert out["error"] is not None and "reduce_stats" in out["error"] and f"rank {r}" in out["error"], out
        assert out["elapsed"] < timeout + 10.0
